//! The OpenAPI 3 document, generated from the handlers and types (`utoipa`), served at
//! `/api/v1/openapi.json` and kept in the repository as `services/api/openapi.json`
//! (`liftwire-api openapi > services/api/openapi.json`; a test fails when it is stale).

use axum::Json;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::{devices, dto, live, problem, routes};

/// The API's OpenAPI document.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "liftwire dashboard API",
        description = "Elevator data for building managers. Bearer JWT; every route is scoped to the buildings in the token. Errors are RFC 7807 problems with a stable `code`."
    ),
    paths(
        crate::me,
        routes::buildings,
        live::elevators,
        live::building_live_state,
        live::building_live_stream,
        routes::history,
        routes::events,
        routes::incidents,
        routes::kpis,
        routes::alerts,
        routes::alert,
        routes::acknowledge,
        routes::resolve,
        devices::list,
        devices::provision,
        devices::rotate,
        devices::send,
        devices::list_commands,
        devices::command,
    ),
    components(schemas(
        crate::Me,
        crate::auth::Role,
        problem::Problem,
        dto::Building,
        dto::BuildingPage,
        live::Elevator,
        live::Fault,
        live::ElevatorPage,
        live::BuildingLive,
        dto::History,
        dto::HistoryBucket,
        dto::Event,
        dto::EventPage,
        dto::Incident,
        dto::IncidentPage,
        dto::Kpis,
        dto::ElevatorKpis,
        dto::KpiReport,
        dto::Alert,
        dto::AlertTransition,
        dto::AlertDetail,
        dto::AlertPage,
        dto::AlertAction,
        devices::Device,
        devices::DevicePage,
        devices::DeviceSecret,
        devices::NewDevice,
        devices::Command,
        devices::NewCommand,
        devices::CommandPage,
    )),
    modifiers(&Bearer)
)]
pub struct ApiDoc;

struct Bearer;

impl Modify for Bearer {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

/// The document as pretty JSON (what is committed).
pub fn json() -> String {
    ApiDoc::openapi()
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

/// `GET /api/v1/openapi.json` (no token needed).
pub async fn document() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_committed_document_is_current() {
        let committed = include_str!("../openapi.json");
        assert!(
            committed.trim_end() == json().trim_end(),
            "services/api/openapi.json is stale: run \
             `cargo run -p liftwire-api -- openapi > services/api/openapi.json`"
        );
        let doc = ApiDoc::openapi();
        assert!(doc.paths.paths.len() >= 13);
        for (path, item) in &doc.paths.paths {
            for op in [&item.get, &item.post].into_iter().flatten() {
                assert!(
                    path == "/api/v1/openapi.json" || op.security.is_some(),
                    "{path} must require a bearer token"
                );
            }
        }
    }
}
