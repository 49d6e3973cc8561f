//! `keywarden.v1.UsageService`: validate, convert, call [`UsageReports`], convert back.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::convert;
use super::error::checked;
use crate::domain::rollup::{self, Granularity, GroupBy, REFUSALS};
use crate::domain::validate::Violations;
use crate::proto;
use crate::proto::usage_service_server::UsageService;
use crate::store::{UsageRow, page_token};
use crate::usage_reports::{UsageReports, UsageRequest};

pub struct UsageApi {
    reports: Arc<UsageReports>,
    clock: crate::clock::Clock,
}

impl UsageApi {
    pub fn new(reports: Arc<UsageReports>, clock: crate::clock::Clock) -> Self {
        UsageApi { reports, clock }
    }
}

fn group_by(raw: i32, v: &mut Violations) -> GroupBy {
    match proto::UsageGroupBy::try_from(raw) {
        Ok(proto::UsageGroupBy::Key) => GroupBy::Key,
        Ok(proto::UsageGroupBy::Owner) => GroupBy::Owner,
        Ok(proto::UsageGroupBy::Team) => GroupBy::Team,
        Ok(proto::UsageGroupBy::Workspace | proto::UsageGroupBy::Unspecified) => GroupBy::Workspace,
        Err(_) => {
            v.add("group_by", "is not a known grouping");
            GroupBy::Workspace
        }
    }
}

fn granularity(raw: i32, v: &mut Violations) -> Granularity {
    match proto::UsageGranularity::try_from(raw) {
        Ok(proto::UsageGranularity::Hour) => Granularity::Hour,
        Ok(proto::UsageGranularity::Day | proto::UsageGranularity::Unspecified) => Granularity::Day,
        Err(_) => {
            v.add("granularity", "is not a known granularity");
            Granularity::Day
        }
    }
}

fn record_pb(r: &UsageRow) -> proto::UsageRecord {
    let refused = |code| {
        REFUSALS
            .iter()
            .position(|(c, _)| *c == code)
            .map_or(0, |i| r.tally.refused[i])
    };
    use crate::domain::key::VerifyCode as C;
    proto::UsageRecord {
        group: r.group.clone(),
        bucket_start: Some(convert::timestamp(r.bucket_start)),
        admitted: r.tally.admitted,
        refused: r.tally.refused_total(),
        refused_by_reason: Some(proto::UsageRefusals {
            rate_limited: refused(C::RateLimited),
            budget_exceeded: refused(C::BudgetExceeded),
            insufficient_scope: refused(C::InsufficientScope),
            resource_forbidden: refused(C::ResourceForbidden),
            ip_forbidden: refused(C::IpForbidden),
            revoked: refused(C::Revoked),
            expired: refused(C::Expired),
            plan_forbids_keys: refused(C::PlanForbidsKeys),
        }),
        tokens: r.tally.tokens,
        spend_micros: r.tally.spend_micros,
    }
}

#[tonic::async_trait]
impl UsageService for UsageApi {
    async fn query_usage(
        &self,
        request: Request<proto::QueryUsageRequest>,
    ) -> Result<Response<proto::QueryUsageResponse>, Status> {
        let r = request.into_inner();
        let mut v = Violations::default();
        v.workspace_id("workspace_id", &r.workspace_id);
        let group_by = group_by(r.group_by, &mut v);
        let granularity = granularity(r.granularity, &mut v);
        let since = match r.since.as_ref() {
            Some(ts) => convert::micros_of(ts, "since", &mut v),
            None => {
                v.add("since", "is required");
                None
            }
        };
        let until = match r.until.as_ref() {
            Some(ts) => convert::micros_of(ts, "until", &mut v),
            None => Some(self.clock.now()),
        };
        if let (Some(since), Some(until)) = (since, until)
            && let Err(why) = rollup::check_span(granularity, since, until)
        {
            v.add("until", why);
        }
        let page_size = v.page_size("page_size", r.page_size);
        let after =
            convert::page_token_field(&r.page_token, &mut v, page_token::decode_usage_cursor);
        let actor = convert::actor(r.actor.as_ref(), &mut v);
        let span = since.zip(until);
        let (actor, (since, until)) = checked(v, Some(actor).zip(span))?;
        let (rows, next) = self
            .reports
            .query(
                &actor,
                UsageRequest {
                    workspace_id: r.workspace_id,
                    group_by,
                    granularity,
                    since,
                    until,
                    page_size,
                    after,
                },
            )
            .await?;
        Ok(Response::new(proto::QueryUsageResponse {
            records: rows.iter().map(record_pb).collect(),
            next_page_token: next
                .map(|(bucket, group)| page_token::encode_usage_cursor(bucket, &group))
                .unwrap_or_default(),
        }))
    }
}
