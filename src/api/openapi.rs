//! An OpenAPI 3 document for the JSON surface (the Connect protocol's unary calls),
//! generated from the descriptors compiled into the server, so it cannot drift from the
//! protos: one `POST /<package.Service>/<Method>` per unary RPC, its request and response
//! the messages in protobuf's canonical JSON mapping, every error Connect's error shape.
//! Served at `GET /openapi.json` on the gRPC port beside the calls it describes.

use std::collections::BTreeMap;

use prost_reflect::{Cardinality, DescriptorPool, FieldDescriptor, Kind, MessageDescriptor};
use serde_json::{Value, json};

/// The document for every unary RPC of the `keywarden.v1` services in `pool`.
pub fn document(pool: &DescriptorPool) -> Value {
    let mut paths = serde_json::Map::new();
    let mut schemas = BTreeMap::new();
    for service in pool
        .services()
        .filter(|s| s.package_name() == "keywarden.v1")
    {
        for method in service.methods() {
            if method.is_client_streaming() || method.is_server_streaming() {
                continue;
            }
            let (input, output) = (method.input(), method.output());
            collect(&input, &mut schemas);
            collect(&output, &mut schemas);
            let summary = comment(method.parent_file().file_descriptor_proto(), &method);
            paths.insert(
                format!("/{}/{}", service.full_name(), method.name()),
                json!({ "post": {
                    "operationId": format!("{}.{}", service.name(), method.name()),
                    "tags": [service.name()],
                    "summary": summary,
                    "requestBody": { "required": true, "content": {
                        "application/json": { "schema": reference(&input) }
                    }},
                    "responses": {
                        "200": { "description": "OK", "content": {
                            "application/json": { "schema": reference(&output) }
                        }},
                        "default": { "description": "A Connect error", "content": {
                            "application/json": { "schema": { "$ref": "#/components/schemas/connect.error" } }
                        }}
                    }
                }}),
            );
        }
    }
    let mut components: serde_json::Map<String, Value> = schemas.into_iter().collect();
    components.insert(
        "connect.error".into(),
        json!({
            "type": "object",
            "properties": {
                "code": { "type": "string", "enum": [
                    "canceled", "unknown", "invalid_argument", "deadline_exceeded",
                    "not_found", "already_exists", "permission_denied", "resource_exhausted",
                    "failed_precondition", "aborted", "out_of_range", "unimplemented",
                    "internal", "unavailable", "data_loss", "unauthenticated"
                ]},
                "message": { "type": "string" },
                "details": { "type": "array", "items": {
                    "type": "object",
                    "properties": {
                        "type": { "type": "string" },
                        "value": { "type": "string", "format": "byte" },
                        "debug": { "type": "object" }
                    }
                }}
            },
            "required": ["code"]
        }),
    );
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "Keywarden",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Every unary RPC of keywarden.v1 as HTTP/JSON by the Connect protocol: POST the request message in protobuf's canonical JSON mapping with `Content-Type: application/json` and `Authorization: Bearer <token>`."
        },
        "components": {
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } },
            "schemas": components
        },
        "security": [{ "bearer": [] }],
        "paths": paths
    })
}

/// The leading comment of a method in its file's source info, if kept.
fn comment(
    file: &prost_types::FileDescriptorProto,
    method: &prost_reflect::MethodDescriptor,
) -> String {
    let path = method.path();
    file.source_code_info
        .as_ref()
        .and_then(|info| info.location.iter().find(|l| l.path == path))
        .and_then(|l| l.leading_comments.clone())
        .map(|c| c.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| method.name().to_owned())
}

fn reference(message: &MessageDescriptor) -> Value {
    match well_known(message) {
        Some(schema) => schema,
        None => json!({ "$ref": format!("#/components/schemas/{}", message.full_name()) }),
    }
}

/// The JSON forms protobuf's mapping gives the well-known types used here.
fn well_known(message: &MessageDescriptor) -> Option<Value> {
    Some(match message.full_name() {
        "google.protobuf.Timestamp" => json!({ "type": "string", "format": "date-time" }),
        "google.protobuf.Duration" => json!({ "type": "string", "example": "1.5s" }),
        "google.protobuf.FieldMask" => {
            json!({ "type": "string", "description": "comma-separated field paths" })
        }
        "google.protobuf.Empty" => json!({ "type": "object" }),
        "google.protobuf.Any" | "google.protobuf.Struct" => json!({ "type": "object" }),
        _ => return None,
    })
}

/// Adds `message` and every message it reaches to `schemas` (once each).
fn collect(message: &MessageDescriptor, schemas: &mut BTreeMap<String, Value>) {
    if well_known(message).is_some() || schemas.contains_key(message.full_name()) {
        return;
    }
    // Placed first, so a message that reaches itself stops here.
    schemas.insert(message.full_name().to_owned(), Value::Null);
    let mut properties = serde_json::Map::new();
    for field in message.fields() {
        properties.insert(field.json_name().to_owned(), field_schema(&field, schemas));
    }
    schemas.insert(
        message.full_name().to_owned(),
        json!({ "type": "object", "properties": properties, "additionalProperties": false }),
    );
}

fn field_schema(field: &FieldDescriptor, schemas: &mut BTreeMap<String, Value>) -> Value {
    if field.is_map()
        && let Kind::Message(entry) = field.kind()
    {
        let value = entry.map_entry_value_field();
        return json!({ "type": "object", "additionalProperties": kind_schema(&value.kind(), schemas) });
    }
    let schema = kind_schema(&field.kind(), schemas);
    if field.cardinality() == Cardinality::Repeated {
        json!({ "type": "array", "items": schema })
    } else {
        schema
    }
}

fn kind_schema(kind: &Kind, schemas: &mut BTreeMap<String, Value>) -> Value {
    match kind {
        Kind::Double | Kind::Float => json!({ "type": "number" }),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
            json!({ "type": "integer", "format": "int32" })
        }
        Kind::Uint32 | Kind::Fixed32 => {
            json!({ "type": "integer", "format": "int64", "minimum": 0 })
        }
        // 64-bit integers are strings in the JSON mapping (numbers are accepted too).
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
            json!({ "type": "string", "format": "int64" })
        }
        Kind::Uint64 | Kind::Fixed64 => json!({ "type": "string", "format": "uint64" }),
        Kind::Bool => json!({ "type": "boolean" }),
        Kind::String => json!({ "type": "string" }),
        Kind::Bytes => json!({ "type": "string", "format": "byte" }),
        Kind::Enum(e) => {
            let names: Vec<String> = e.values().map(|v| v.name().to_owned()).collect();
            json!({ "type": "string", "enum": names })
        }
        Kind::Message(m) => {
            collect(m, schemas);
            reference(m)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::connect::Rpcs;

    /// Every `$ref` names a schema the document holds, and every unary RPC has its path.
    #[test]
    fn every_unary_rpc_has_a_path_and_every_reference_resolves() {
        let rpcs = Rpcs::compiled().unwrap();
        let doc = document(rpcs.pool());
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        let text = doc.to_string();
        for piece in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
            let name = piece.split('"').next().unwrap();
            assert!(
                schemas.contains_key(name),
                "{name} is referenced but missing"
            );
        }
        let paths = doc["paths"].as_object().unwrap();
        for path in rpcs.unary_paths() {
            assert!(paths.contains_key(path), "{path} is missing");
        }
        assert!(!paths.contains_key("/keywarden.v1.RevocationService/WatchRevocations"));
        let issue = &schemas["keywarden.v1.IssueKeyRequest"]["properties"];
        assert_eq!(issue["workspaceId"]["type"], "string");
        assert_eq!(issue["scopes"]["type"], "array");
        assert_eq!(issue["expiresAt"]["format"], "date-time");
        assert_eq!(issue["environment"]["enum"][1], "ENVIRONMENT_LIVE");
        assert_eq!(
            issue["maxBudgetMicros"]["type"], "string",
            "uint64 as a string"
        );
        assert_eq!(issue["metadata"]["type"], "object", "a map");
    }
}
