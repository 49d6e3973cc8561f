//! `keywarden.v1.WebhookService`, for the `admin` role: create, list, delete an endpoint
//! and rotate its signing secret. The secret is in Create's and Rotate's answers only;
//! no answer or error carries one otherwise.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::auth::{Role, require};
use super::convert;
use super::error::{check, internal, refused, store_status};
use super::mutation::Mutation;
use crate::domain::ids;
use crate::domain::refusal::{Reason, Refusal};
use crate::domain::validate::Violations;
use crate::domain::webhook::{self, EventType, WebhookUrl};
use crate::proto;
use crate::proto::webhook_service_server::WebhookService;
use crate::store::WebhookRecord;
use crate::webhooks::{WebhookError, Webhooks, WithSecret};

pub struct WebhookApi {
    webhooks: Arc<Webhooks>,
}

impl WebhookApi {
    pub fn new(webhooks: Arc<Webhooks>) -> Self {
        WebhookApi { webhooks }
    }
}

impl From<WebhookError> for Status {
    fn from(e: WebhookError) -> Self {
        let message = e.to_string();
        match e {
            WebhookError::NoKek => refused(Refusal::new(Reason::KekNotConfigured, message)),
            WebhookError::WorkspaceNotFound(id) => {
                refused(Refusal::new(Reason::WorkspaceNotFound, message).with("workspace_id", id))
            }
            WebhookError::NotFound(id) => {
                refused(Refusal::new(Reason::WebhookNotFound, message).with("webhook_id", id))
            }
            WebhookError::Refused(refusal) => refused(refusal),
            WebhookError::Store(e) => store_status(&e),
            WebhookError::Crypto(_) | WebhookError::Randomness => {
                tracing::error!(error = %message, "webhook operation failed");
                internal()
            }
        }
    }
}

fn webhook_pb(r: &WebhookRecord) -> proto::Webhook {
    proto::Webhook {
        webhook_id: r.webhook_id.clone(),
        workspace_id: r.workspace_id.clone(),
        url: r.url.clone(),
        event_types: r
            .event_types
            .iter()
            .map(|t| t.as_str().to_owned())
            .collect(),
        created_at: Some(convert::timestamp(r.created_at)),
        disabled_at: r.disabled_at.map(convert::timestamp),
        failures: r.failures,
        failing_since: r.failing_since.map(convert::timestamp),
        last_error: r.last_error.clone(),
        next_attempt_at: (r.failures > 0).then(|| convert::timestamp(r.next_attempt_at)),
    }
}

fn webhook_id(v: &mut Violations, s: &str) {
    if s.is_empty() {
        v.add("webhook_id", "is required");
    } else if !ids::is_webhook_id(s) {
        v.add(
            "webhook_id",
            "is not a webhook id (wh_ followed by 24 letters or digits)",
        );
    }
}

impl WebhookApi {
    fn url(&self, v: &mut Violations, raw: &str) {
        match WebhookUrl::parse(raw) {
            Err(why) => v.add("url", why),
            Ok(url) => {
                if let Some(why) = self.webhooks.refuses(&url) {
                    v.add("url", why);
                }
            }
        }
    }
}

fn event_types(v: &mut Violations, given: &[String]) -> Option<Vec<EventType>> {
    match webhook::parse_event_types(given) {
        Ok(types) => Some(types),
        Err((index, why)) => {
            let field =
                index.map_or_else(|| "event_types".to_owned(), |i| format!("event_types[{i}]"));
            // A long unknown value is not repeated back.
            v.add(field, why);
            None
        }
    }
}

fn with_secret(w: WithSecret) -> (Option<proto::Webhook>, String) {
    (Some(webhook_pb(&w.webhook)), w.secret.to_string())
}

#[tonic::async_trait]
impl WebhookService for WebhookApi {
    async fn create_webhook(
        &self,
        request: Request<proto::CreateWebhookRequest>,
    ) -> Result<Response<proto::CreateWebhookResponse>, Status> {
        let mut m = Mutation::by(require(&request, Role::Admin)?.0);
        let r = request.into_inner();
        let v = &mut m.v;
        v.workspace_id("workspace_id", &r.workspace_id);
        self.url(v, &r.url);
        let types = event_types(v, &r.event_types);
        let actor = convert::actor(r.actor.as_ref(), v);
        let (acting, types) = m.acting_with(actor, types)?;
        let created = self
            .webhooks
            .create(&acting, &r.workspace_id, &r.url, types)
            .await?;
        let (webhook, signing_secret) = with_secret(created);
        Ok(Response::new(proto::CreateWebhookResponse {
            webhook,
            signing_secret,
        }))
    }

    async fn list_webhooks(
        &self,
        request: Request<proto::ListWebhooksRequest>,
    ) -> Result<Response<proto::ListWebhooksResponse>, Status> {
        require(&request, Role::Admin)?;
        let r = request.into_inner();
        let mut v = Violations::default();
        v.workspace_id("workspace_id", &r.workspace_id);
        check(v)?;
        let found = self.webhooks.list(&r.workspace_id).await?;
        Ok(Response::new(proto::ListWebhooksResponse {
            webhooks: found.iter().map(webhook_pb).collect(),
        }))
    }

    async fn delete_webhook(
        &self,
        request: Request<proto::DeleteWebhookRequest>,
    ) -> Result<Response<proto::DeleteWebhookResponse>, Status> {
        let mut m = Mutation::by(require(&request, Role::Admin)?.0);
        let r = request.into_inner();
        let v = &mut m.v;
        v.workspace_id("workspace_id", &r.workspace_id);
        webhook_id(v, &r.webhook_id);
        let actor = convert::actor(r.actor.as_ref(), v);
        let acting = m.acting(actor)?;
        self.webhooks
            .delete(&acting, &r.workspace_id, &r.webhook_id)
            .await?;
        Ok(Response::new(proto::DeleteWebhookResponse {}))
    }

    async fn rotate_webhook_secret(
        &self,
        request: Request<proto::RotateWebhookSecretRequest>,
    ) -> Result<Response<proto::RotateWebhookSecretResponse>, Status> {
        let mut m = Mutation::by(require(&request, Role::Admin)?.0);
        let r = request.into_inner();
        let v = &mut m.v;
        v.workspace_id("workspace_id", &r.workspace_id);
        webhook_id(v, &r.webhook_id);
        let actor = convert::actor(r.actor.as_ref(), v);
        let acting = m.acting(actor)?;
        let rotated = self
            .webhooks
            .rotate_secret(&acting, &r.workspace_id, &r.webhook_id)
            .await?;
        let (webhook, signing_secret) = with_secret(rotated);
        Ok(Response::new(proto::RotateWebhookSecretResponse {
            webhook,
            signing_secret,
        }))
    }
}
