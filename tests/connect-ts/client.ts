// Connect's own TypeScript client (@connectrpc/connect, @connectrpc/connect-node) against
// a running Keywarden, with messages and services generated from proto/ by protoc-gen-es.
// It issues a key, verifies it, revokes it, verifies it again, reads the audit log and
// makes one call Keywarden refuses, then prints what it saw as one JSON object for
// tests/connect_ts.rs to check.
//
// Environment: KEYWARDEN_URL (http://host:port), ADMIN_TOKEN, VERIFIER_TOKEN,
// HTTP_VERSION ("1.1" or "2") and WORKSPACE_ID (an existing workspace; ws_test unset).

import { Code, ConnectError, createClient, type Interceptor } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";
import { Environment, OwnerKind } from "./gen/keywarden/v1/common_pb.js";
import { KeyService } from "./gen/keywarden/v1/keys_pb.js";
import { VerifyService, VerifyCode } from "./gen/keywarden/v1/verify_pb.js";

const env = (name: string): string => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
};

const bearer = (token: string): Interceptor => (next) => async (req) => {
  req.header.set("authorization", `Bearer ${token}`);
  return next(req);
};

const transport = (token: string) =>
  createConnectTransport({
    baseUrl: env("KEYWARDEN_URL"),
    httpVersion: env("HTTP_VERSION") === "2" ? "2" : "1.1",
    interceptors: [bearer(token)],
  });

const keys = createClient(KeyService, transport(env("ADMIN_TOKEN")));
const verifier = createClient(VerifyService, transport(env("VERIFIER_TOKEN")));
const actor = { id: "user_1", permissions: ["admin", "read"] };
const workspaceId = process.env.WORKSPACE_ID ?? "ws_test";

const issued = await keys.issueKey({
  workspaceId,
  name: "from typescript",
  environment: Environment.LIVE,
  scopes: ["read"],
  owner: { kind: OwnerKind.USER, id: "user_1" },
  actor,
});
const keyId = issued.keyInfo?.keyId ?? "";
const first = await verifier.verifyKey({ key: issued.key });
await keys.revokeKey({ keyId, reason: "rotated out", actor });
const second = await verifier.verifyKey({ key: issued.key });
const audit = await keys.listAuditEvents({ workspaceId, keyId });

let refusal: { code: string; reason: string; detailTypes: string[] } | null = null;
try {
  await keys.getKey({ keyId: "not a key id" });
} catch (e) {
  const err = ConnectError.from(e);
  refusal = {
    code: Code[err.code],
    reason: err.rawMessage,
    detailTypes: err.details.map((d) => ("type" in d ? d.type : d.desc.typeName)),
  };
}

console.log(
  JSON.stringify({
    keyId,
    createdAtYear: issued.keyInfo?.createdAt
      ? new Date(Number(issued.keyInfo.createdAt.seconds) * 1000).getUTCFullYear()
      : null,
    firstValid: first.valid,
    rateLimitIsBigint: typeof first.rateLimit?.limit === "bigint",
    secondCode: VerifyCode[second.code],
    auditActions: audit.events.map((e) => e.action),
    refusal,
  }),
);
