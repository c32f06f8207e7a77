//! Who may see and change what, on both backends: tenant isolation (OWASP API1, broken object
//! level authorization, and API3, object properties), roles (API5, broken function level
//! authorization), keys limited to a site or a label, revoked and expired keys, and the audit
//! trail of changes.
//!
//! The heart is [`object_routes`]: every route that names an object, one line each. Tenant A's
//! owner, with its API key and with a login session, calls each with tenant B's objects and must
//! get the very 404 an id that does not exist gets; `every_id_route_is_in_the_table` fails when
//! the router or the OpenAPI document gains a route naming an object that the table lacks.

mod support;

use std::collections::BTreeSet;

use fieldgate_cloud::auth::Role;
use fieldgate_cloud::ids::new_id;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value as Json};
use support::{batch, Backend, Tenant, TestCloud, TestGateway};

backend_tests!(
    another_tenants_objects_are_not_found,
    lists_never_show_another_tenants_objects,
    every_id_route_is_in_the_table,
    roles_limit_what_keys_and_sessions_may_do,
    keys_cannot_gain_rights_their_maker_lacks,
    site_scoped_keys_see_only_their_site,
    label_scoped_keys_see_only_their_gateways,
    a_scoped_keys_answer_tells_whether_its_change_was_made,
    revoked_and_expired_keys_are_refused,
    changes_are_audited_with_actor_and_source_ip,
);

/// Every route that names an object, as (method, path, body). `{site}`, `{gateway}`, `{series}`,
/// `{user}` and `{key}` stand for the ids of the objects it is called with, in the path and in
/// body strings. A new route that names an object is one more line here.
fn object_routes() -> Vec<(Method, &'static str, Option<Json>)> {
    vec![
        (Method::GET, "/v1/gateways/{gateway}", None),
        (
            Method::PATCH,
            "/v1/gateways/{gateway}",
            Some(json!({"name": "taken-over", "labels": {"owner": "a"}})),
        ),
        (Method::POST, "/v1/gateways/{gateway}/decommission", None),
        (Method::GET, "/v1/sites/{site}", None),
        (Method::GET, "/v1/series/{series}", None),
        (Method::GET, "/v1/series/{series}/readings", None),
        (Method::DELETE, "/v1/users/{user}", None),
        (Method::DELETE, "/v1/api-keys/{key}", None),
        (
            Method::POST,
            "/v1/enrollment-tokens",
            Some(json!({"site_id": "{site}", "expires_in_hours": 1})),
        ),
        (
            Method::POST,
            "/v1/api-keys",
            Some(json!({"name": "foothold", "role": "viewer", "site_id": "{site}"})),
        ),
    ]
}

/// Every list, as a path (`{…}` filled as in [`object_routes`]): none may show another tenant's
/// objects, whatever its filters name. A query parameter that names an object is checked here.
const LIST_ROUTES: &[&str] = &[
    "/v1/gateways",
    "/v1/gateways?status=active",
    "/v1/gateways?site_id={site}",
    "/v1/gateways?label=line%3D3",
    "/v1/sites",
    "/v1/series",
    "/v1/series?gateway_id={gateway}",
    "/v1/users",
    "/v1/api-keys",
    "/v1/enrollment-tokens",
    "/v1/audit",
    "/v1/me",
];

/// Routes that take an object id in their body but are not in [`object_routes`], and why.
const BODY_IDS_CHECKED_ELSEWHERE: &[(&str, &str, &str)] = &[(
    "POST",
    "/v1/enroll",
    "authorised by the enrollment token, not a tenant's principal; \
     another_tenants_objects_are_not_found tries another tenant's site",
)];

/// The ids an object route is called with.
#[derive(Clone, Debug)]
struct Ids {
    site: String,
    gateway: String,
    series: String,
    user: String,
    key: String,
}

impl Ids {
    /// Ids of the right shape that no object has.
    fn nonexistent() -> Ids {
        Ids {
            site: new_id("st"),
            gateway: new_id("gw"),
            series: new_id("sr"),
            user: new_id("us"),
            key: new_id("ak"),
        }
    }

    fn fill(&self, text: &str) -> String {
        text.replace("{site}", &self.site)
            .replace("{gateway}", &self.gateway)
            .replace("{series}", &self.series)
            .replace("{user}", &self.user)
            .replace("{key}", &self.key)
    }

    fn fill_json(&self, value: &Json) -> Json {
        match value {
            Json::String(text) => Json::String(self.fill(text)),
            Json::Array(items) => items.iter().map(|v| self.fill_json(v)).collect(),
            Json::Object(fields) => Json::Object(
                fields
                    .iter()
                    .map(|(k, v)| (k.clone(), self.fill_json(v)))
                    .collect(),
            ),
            other => other.clone(),
        }
    }
}

/// One of every object a tenant has, made through the API with the bootstrap owner key.
struct Objects {
    ids: Ids,
    gateway: TestGateway,
    /// An enrollment token not used yet (the gateway spent another).
    spare_token: String,
    /// The secret of the API key `ids.key` (a viewer key).
    key_secret: String,
}

impl Objects {
    async fn make(cloud: &TestCloud, tenant: &Tenant) -> Objects {
        let owner = tenant.key.as_str();
        let (site, token) = cloud.site_and_token(owner, "plant-1").await;
        let gateway = cloud.enroll(&token, &site, "gw-1").await;
        let (status, ack) = cloud
            .ingest(&gateway, &batch(&gateway.id, "raw", 0, 99))
            .await;
        assert_eq!(status, StatusCode::OK, "{ack}");
        let (status, labelled) = cloud
            .call(
                Method::PATCH,
                &format!("/v1/gateways/{}", gateway.id),
                Some(owner),
                Some(json!({"labels": {"line": "3"}})),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{labelled}");
        let series = series_of(cloud, owner, &gateway.id).await[0].clone();
        let (status, spare) = cloud
            .call(
                Method::POST,
                "/v1/enrollment-tokens",
                Some(owner),
                Some(json!({"site_id": site, "expires_in_hours": 1})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{spare}");
        let email = format!("person@{}.example", tenant.name);
        let (status, person) = cloud
            .call(
                Method::POST,
                "/v1/users",
                Some(owner),
                Some(json!({"email": email, "role": "viewer"})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{person}");
        let (key, key_secret) =
            make_key(cloud, owner, json!({"name": "spare", "role": "viewer"})).await;
        Objects {
            ids: Ids {
                site,
                gateway: gateway.id.clone(),
                series,
                user: text(&person["user"]["id"]),
                key,
            },
            gateway,
            spare_token: text(&spare["token"]["id"]),
            key_secret,
        }
    }
}

/// A tenant with one of every object and a login session of its owner.
struct Side {
    tenant: Tenant,
    objects: Objects,
    session: String,
}

impl Side {
    async fn new(cloud: &TestCloud, name: &str) -> Side {
        let tenant = cloud.tenant(name).await;
        let objects = Objects::make(cloud, &tenant).await;
        let session = login(
            cloud,
            &tenant.name,
            &tenant.owner_email,
            &tenant.owner_password,
        )
        .await;
        Side {
            tenant,
            objects,
            session,
        }
    }

    /// The owner, as its API key and as its login session.
    fn owners(&self) -> [(&'static str, &str); 2] {
        [
            ("the owner's API key", self.tenant.key.as_str()),
            ("the owner's login session", self.session.as_str()),
        ]
    }
}

/// Tenant A (the caller) and tenant B (whose objects A must not reach).
struct World {
    cloud: TestCloud,
    a: Side,
    b: Side,
}

impl World {
    async fn new(backend: Backend) -> Option<World> {
        let cloud = TestCloud::start(backend).await?;
        let a = Side::new(&cloud, "a").await;
        let b = Side::new(&cloud, "b").await;
        Some(World { cloud, a, b })
    }

    /// Tenant A's owner calls every object route with tenant B's objects: each answers 404
    /// `not_found`, exactly as for ids that do not exist.
    async fn a_reaches_for_bs_objects(&self) {
        let nonexistent = Ids::nonexistent();
        for (who, token) in self.a.owners() {
            for (method, path, body) in object_routes() {
                let route = format!("{method} {path}");
                let (status, answer) = call_route(
                    &self.cloud,
                    token,
                    &method,
                    path,
                    &body,
                    &self.b.objects.ids,
                )
                .await;
                assert_eq!(
                    (status, answer["code"].as_str()),
                    (StatusCode::NOT_FOUND, Some("not_found")),
                    "tenant A's {who}: {route} with tenant B's object: {answer}"
                );
                let unknown =
                    call_route(&self.cloud, token, &method, path, &body, &nonexistent).await;
                assert_eq!(
                    (status, &answer),
                    (unknown.0, &unknown.1),
                    "tenant A's {who}: {route} must answer for tenant B's object what it answers \
                     for an id that does not exist"
                );
            }
        }
    }
}

async fn another_tenants_objects_are_not_found(backend: Backend) {
    let Some(w) = World::new(backend).await else {
        return;
    };
    let cloud = &w.cloud;
    w.a_reaches_for_bs_objects().await;

    // Gateways: A's gateway cannot send readings in the name of B's, and A's enrollment token
    // cannot enroll a gateway into B's site.
    let b_gateway = &w.b.objects.gateway;
    let (status, answer) = cloud
        .ingest(&w.a.objects.gateway, &batch(&b_gateway.id, "raw", 100, 199))
        .await;
    assert_eq!(
        (status, answer["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("forbidden")),
        "a batch naming another tenant's gateway: {answer}"
    );
    let a_token = cloud
        .enrollment_token(&w.a.tenant.key, &w.a.objects.ids.site)
        .await;
    let (status, answer, _) = cloud
        .try_enroll(&a_token, &w.b.objects.ids.site, "intruder")
        .await;
    assert_eq!(
        (status, answer["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("forbidden")),
        "enrolling into another tenant's site: {answer}"
    );
    // The refused enrollment spent nothing: the token still enrolls into its own site.
    cloud.enroll(&a_token, &w.a.objects.ids.site, "gw-2").await;

    assert_b_untouched(&w).await;

    // The same table with A's own objects succeeds: the 404s above come from the tenant
    // boundary, not from malformed requests. (Destructive, so last, and with the key only.)
    for (method, path, body) in object_routes() {
        let (status, answer) = call_route(
            cloud,
            &w.a.tenant.key,
            &method,
            path,
            &body,
            &w.a.objects.ids,
        )
        .await;
        assert!(
            status.is_success(),
            "tenant A's owner: {method} {path} with its own object: {status} {answer}"
        );
    }
    w.cloud.stop().await;
}

/// Tenant B's objects are as B made them.
async fn assert_b_untouched(w: &World) {
    let cloud = &w.cloud;
    let b = &w.b;
    let ids = &b.objects.ids;
    let key = b.tenant.key.as_str();
    let (status, gateway) = get(cloud, key, &format!("/v1/gateways/{}", ids.gateway)).await;
    assert_eq!(status, StatusCode::OK, "{gateway}");
    assert_eq!(gateway["status"], "active", "{gateway}");
    assert_eq!(gateway["name"], "gw-1", "{gateway}");
    assert_eq!(gateway["labels"], json!({"line": "3"}), "{gateway}");
    let (status, site) = get(cloud, key, &format!("/v1/sites/{}", ids.site)).await;
    assert_eq!(
        (status, &site["name"]),
        (StatusCode::OK, &json!("plant-1")),
        "{site}"
    );
    let (status, series) = get(cloud, key, &format!("/v1/series/{}", ids.series)).await;
    assert_eq!(status, StatusCode::OK, "{series}");
    let (status, readings) = get(cloud, key, &format!("/v1/series/{}/readings", ids.series)).await;
    assert_eq!(status, StatusCode::OK, "{readings}");
    assert_eq!(
        readings["readings"].as_array().unwrap().len() as i64,
        series["count"].as_i64().unwrap(),
        "{readings}"
    );
    assert!(listed_ids(cloud, key, "/v1/users")
        .await
        .contains(&ids.user));
    let tokens = listed_ids(cloud, key, "/v1/enrollment-tokens").await;
    assert_eq!(
        tokens.len(),
        2,
        "the spent and the spare token, no more: {tokens:?}"
    );
    assert!(tokens.contains(&b.objects.spare_token));
    let (status, keys) = get(cloud, key, "/v1/api-keys").await;
    assert_eq!(status, StatusCode::OK, "{keys}");
    let keys = keys.as_array().unwrap();
    assert_eq!(
        keys.len(),
        2,
        "the bootstrap and the spare key, no more: {keys:?}"
    );
    assert!(keys.iter().all(|k| k["revoked_at"].is_null()), "{keys:?}");
    let (status, me) = get(cloud, &b.objects.key_secret, "/v1/me").await;
    assert_eq!(status, StatusCode::OK, "B's spare key still works: {me}");
    assert_eq!(me["tenant_id"].as_str(), Some(b.tenant.id.as_str()));
    // The gateway's certificate was not revoked: it still delivers, and its stream holds only
    // what it sent itself (nothing A's gateway sent in its name).
    let (status, ack) = cloud
        .ingest(&b.objects.gateway, &batch(&ids.gateway, "raw", 100, 199))
        .await;
    assert_eq!(status, StatusCode::OK, "{ack}");
    assert_eq!(ack["stored"].as_u64(), Some(100), "{ack}");
}

async fn lists_never_show_another_tenants_objects(backend: Backend) {
    let Some(w) = World::new(backend).await else {
        return;
    };
    let cloud = &w.cloud;
    let secret_ids = every_id_of(cloud, &w.b).await;
    for (who, token) in w.a.owners() {
        for path in LIST_ROUTES {
            let path = w.b.objects.ids.fill(path);
            let (status, answer) = get(cloud, token, &path).await;
            assert_eq!(
                status,
                StatusCode::OK,
                "tenant A's {who}: GET {path}: {answer}"
            );
            let text = answer.to_string();
            for id in &secret_ids {
                assert!(
                    !text.contains(id.as_str()),
                    "tenant A's {who}: GET {path} shows {id} of tenant B: {answer}"
                );
            }
        }
        // The lists are not empty for their own tenant: the checks above are not vacuous.
        let own = &w.a.objects.ids;
        for (path, id) in [
            ("/v1/gateways", &own.gateway),
            ("/v1/gateways?label=line%3D3", &own.gateway),
            ("/v1/sites", &own.site),
            ("/v1/series", &own.series),
            ("/v1/users", &own.user),
            ("/v1/api-keys", &own.key),
            ("/v1/enrollment-tokens", &w.a.objects.spare_token),
        ] {
            assert!(
                listed_ids(cloud, token, path).await.contains(id),
                "tenant A's {who}: GET {path} lacks A's own {id}"
            );
        }
        let (_, audit) = get(cloud, token, "/v1/audit").await;
        assert!(audit.to_string().contains(own.site.as_str()), "{audit}");
    }
    w.cloud.stop().await;
}

/// Every id tenant B has, gathered through B's own lists.
async fn every_id_of(cloud: &TestCloud, side: &Side) -> BTreeSet<String> {
    let key = side.tenant.key.as_str();
    let mut ids = BTreeSet::from([side.tenant.id.clone()]);
    for path in [
        "/v1/sites",
        "/v1/gateways",
        "/v1/series",
        "/v1/users",
        "/v1/api-keys",
        "/v1/enrollment-tokens",
        "/v1/audit",
    ] {
        let found = listed_ids(cloud, key, path).await;
        assert!(!found.is_empty(), "tenant B lists nothing at {path}");
        ids.extend(found);
    }
    let o = &side.objects.ids;
    for id in [&o.site, &o.gateway, &o.series, &o.user, &o.key] {
        assert!(ids.contains(id), "{id} missing from tenant B's lists");
    }
    ids
}

async fn every_id_route_is_in_the_table(backend: Backend) {
    let Some(cloud) = TestCloud::start(backend).await else {
        return;
    };
    let (status, doc) = cloud
        .call(Method::GET, "/v1/openapi.json", None, None)
        .await;
    assert_eq!(status, StatusCode::OK, "{doc}");
    let table: BTreeSet<(String, String)> = object_routes()
        .iter()
        .map(|(method, path, _)| (method.to_string(), generic(path)))
        .collect();
    let documented = operations(&doc)
        .into_iter()
        .filter(|(_, path, _)| path.contains('{'))
        .map(|(method, path, _)| (method, generic(&path)))
        .collect::<BTreeSet<_>>();
    let routed = id_routes_in_router(include_str!("../src/api.rs"));
    let known = ("PATCH".to_string(), "/v1/gateways/{id}".to_string());
    assert!(
        routed.contains(&known),
        "reading the routes of api.rs failed: {routed:?}"
    );
    assert!(
        documented.contains(&known),
        "reading the OpenAPI paths failed: {documented:?}"
    );
    for route in documented.iter().chain(&routed) {
        assert!(
            table.contains(route),
            "{route:?} names an object but is not in object_routes(): add it there"
        );
    }
    for route in table.iter().filter(|(_, path)| path.contains('{')) {
        assert!(
            routed.contains(route),
            "object_routes() has {route:?}, which api.rs does not route"
        );
    }
    // Objects named in a request body or a query string are covered too.
    let mut seen = BTreeSet::new();
    for (method, path, op) in operations(&doc) {
        for field in body_id_fields(&doc, &op) {
            seen.insert(format!("{method} {path} body {field}"));
            let elsewhere = BODY_IDS_CHECKED_ELSEWHERE
                .iter()
                .any(|(m, p, _)| *m == method && *p == path);
            assert!(
                elsewhere || table.contains(&(method.clone(), path.clone())),
                "{method} {path} takes `{field}` in its body but is not in object_routes()"
            );
        }
        for field in query_id_fields(&op) {
            seen.insert(format!("{method} {path} query {field}"));
            let filter = format!("{path}?{field}=");
            assert!(
                LIST_ROUTES.iter().any(|list| list.starts_with(&filter)),
                "{method} {path} takes `{field}` in its query but LIST_ROUTES does not try it"
            );
        }
    }
    for known in [
        "POST /v1/enrollment-tokens body site_id",
        "POST /v1/api-keys body site_id",
        "GET /v1/series query gateway_id",
    ] {
        assert!(
            seen.contains(known),
            "reading the OpenAPI document failed: {seen:?}"
        );
    }
    cloud.stop().await;
}

/// A path with every `{…}` parameter spelled `{id}`.
fn generic(path: &str) -> String {
    let mut out = String::new();
    let mut rest = path;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        out.push_str("{id}");
        rest = rest[start..]
            .find('}')
            .map_or("", |end| &rest[start + end + 1..]);
    }
    out.push_str(rest);
    out
}

/// Every operation of the OpenAPI document: (METHOD, path, operation).
fn operations(doc: &Json) -> Vec<(String, String, Json)> {
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("the document has paths") {
        for (method, op) in item.as_object().unwrap() {
            if ["get", "put", "post", "delete", "patch"].contains(&method.as_str()) {
                out.push((method.to_uppercase(), path.clone(), op.clone()));
            }
        }
    }
    out
}

/// The `…_id` properties of an operation's JSON request body.
fn body_id_fields(doc: &Json, op: &Json) -> Vec<String> {
    let schema = &op["requestBody"]["content"]["application/json"]["schema"];
    let schema = match schema["$ref"].as_str() {
        Some(reference) => {
            let name = reference.trim_start_matches("#/components/schemas/");
            &doc["components"]["schemas"][name]
        }
        None => schema,
    };
    schema["properties"]
        .as_object()
        .map(|props| {
            props
                .keys()
                .filter(|k| k.ends_with("_id"))
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

/// The `…_id` query parameters of an operation.
fn query_id_fields(op: &Json) -> Vec<String> {
    op["parameters"]
        .as_array()
        .map(|params| {
            params
                .iter()
                .filter(|p| p["in"] == "query")
                .filter_map(|p| p["name"].as_str())
                .filter(|name| name.ends_with("_id"))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// The (METHOD, `/v1…` path) of every `.route("…{…}…", …)` line of the router's source.
fn id_routes_in_router(source: &str) -> BTreeSet<(String, String)> {
    let mut routes = BTreeSet::new();
    // Whatever rustfmt does to the line breaks, each route reads `.route("path", handlers)`.
    let flat: String = source.split_whitespace().collect();
    for call in flat.split(".route(").skip(1) {
        let Some(rest) = call.strip_prefix('"') else {
            continue;
        };
        let rest = rest.split(".route(").next().unwrap_or(rest);
        let Some((path, handlers)) = rest.split_once('"') else {
            continue;
        };
        if !path.contains('{') {
            continue;
        }
        for method in ["get", "put", "post", "delete", "patch"] {
            let called = handlers
                .match_indices(&format!("{method}("))
                .any(|(at, _)| {
                    let before = handlers[..at].chars().next_back();
                    !before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':')
                });
            if called {
                routes.insert((method.to_uppercase(), generic(&format!("/v1{path}"))));
            }
        }
    }
    routes
}

/// (method, path, body, least role) of the API's routes for people and keys.
fn role_routes() -> Vec<(Method, &'static str, Option<Json>, Role)> {
    vec![
        (Method::GET, "/v1/me", None, Role::Viewer),
        (Method::GET, "/v1/sites", None, Role::Viewer),
        (Method::GET, "/v1/sites/{site}", None, Role::Viewer),
        (Method::GET, "/v1/gateways", None, Role::Viewer),
        (Method::GET, "/v1/gateways/{gateway}", None, Role::Viewer),
        (Method::GET, "/v1/series", None, Role::Viewer),
        (Method::GET, "/v1/series/{series}", None, Role::Viewer),
        (
            Method::GET,
            "/v1/series/{series}/readings",
            None,
            Role::Viewer,
        ),
        (Method::GET, "/v1/enrollment-tokens", None, Role::Installer),
        (
            Method::POST,
            "/v1/sites",
            Some(json!({"name": "plant-2"})),
            Role::Installer,
        ),
        (
            Method::POST,
            "/v1/enrollment-tokens",
            Some(json!({"site_id": "{site}", "expires_in_hours": 1})),
            Role::Installer,
        ),
        (
            Method::PATCH,
            "/v1/gateways/{gateway}",
            Some(json!({"labels": {"line": "7"}})),
            Role::Operator,
        ),
        (
            Method::POST,
            "/v1/gateways/{gateway}/decommission",
            None,
            Role::Operator,
        ),
        (Method::GET, "/v1/users", None, Role::Owner),
        (
            Method::POST,
            "/v1/users",
            Some(json!({"email": "new@a.example", "role": "viewer"})),
            Role::Owner,
        ),
        (Method::DELETE, "/v1/users/{user}", None, Role::Owner),
        (Method::GET, "/v1/api-keys", None, Role::Owner),
        (
            Method::POST,
            "/v1/api-keys",
            Some(json!({"name": "made", "role": "viewer"})),
            Role::Owner,
        ),
        (Method::DELETE, "/v1/api-keys/{key}", None, Role::Owner),
        (Method::GET, "/v1/audit", None, Role::Owner),
    ]
}

async fn roles_limit_what_keys_and_sessions_may_do(backend: Backend) {
    let Some(cloud) = TestCloud::start(backend).await else {
        return;
    };
    let tenant = cloud.tenant("a").await;
    let objects = Objects::make(&cloud, &tenant).await;
    let owner = tenant.key.as_str();
    let mut callers: Vec<(String, Role, String)> = Vec::new();
    for role in [Role::Viewer, Role::Installer, Role::Operator] {
        let name = role.as_str();
        let (_, secret) = make_key(&cloud, owner, json!({"name": name, "role": name})).await;
        callers.push((format!("the {name} API key"), role, secret));
    }
    for role in [Role::Viewer, Role::Operator] {
        let session = person_session(&cloud, &tenant, role).await;
        callers.push((
            format!("the {} login session", role.as_str()),
            role,
            session,
        ));
    }
    let owner_session = login(
        &cloud,
        &tenant.name,
        &tenant.owner_email,
        &tenant.owner_password,
    )
    .await;
    callers.push((
        "the owner's login session".into(),
        Role::Owner,
        owner_session,
    ));
    callers.push(("the owner's API key".into(), Role::Owner, owner.to_string()));

    // Below a route's role: 403, whatever the route; at or above it, reads answer.
    for (who, role, token) in &callers {
        for (method, path, body, needs) in role_routes() {
            if *role < needs {
                let (status, answer) =
                    call_route(&cloud, token, &method, path, &body, &objects.ids).await;
                assert_eq!(
                    (status, answer["code"].as_str()),
                    (StatusCode::FORBIDDEN, Some("forbidden")),
                    "{who}: {method} {path} needs {}: {answer}",
                    needs.as_str()
                );
            } else if method == Method::GET {
                let (status, answer) =
                    call_route(&cloud, token, &method, path, &body, &objects.ids).await;
                assert_eq!(status, StatusCode::OK, "{who}: {method} {path}: {answer}");
            }
        }
    }

    // The refused calls changed nothing.
    let (_, gateway) = get(
        &cloud,
        owner,
        &format!("/v1/gateways/{}", objects.ids.gateway),
    )
    .await;
    assert_eq!(gateway["status"], "active", "{gateway}");
    assert_eq!(gateway["labels"], json!({"line": "3"}), "{gateway}");
    let sites = listed_ids(&cloud, owner, "/v1/sites").await;
    assert_eq!(sites, BTreeSet::from([objects.ids.site.clone()]));
    assert!(listed_ids(&cloud, owner, "/v1/users")
        .await
        .contains(&objects.ids.user));
    assert_eq!(
        get(&cloud, &objects.key_secret, "/v1/me").await.0,
        StatusCode::OK
    );

    // Each change succeeds for the least role that may make it: an installer makes sites and
    // enrollment tokens, an operator relabels and decommissions, an owner manages people and keys.
    for (method, path, body, needs) in role_routes() {
        if method == Method::GET {
            continue;
        }
        let (who, _, token) = callers.iter().find(|(_, role, _)| *role == needs).unwrap();
        let (status, answer) = call_route(&cloud, token, &method, path, &body, &objects.ids).await;
        assert!(
            status.is_success(),
            "{who}: {method} {path}: {status} {answer}"
        );
    }
    let (_, gateway) = get(
        &cloud,
        owner,
        &format!("/v1/gateways/{}", objects.ids.gateway),
    )
    .await;
    assert_eq!(gateway["status"], "decommissioned", "{gateway}");
    assert_eq!(gateway["labels"], json!({"line": "7"}), "{gateway}");
    cloud.stop().await;
}

async fn keys_cannot_gain_rights_their_maker_lacks(backend: Backend) {
    let Some(cloud) = TestCloud::start(backend).await else {
        return;
    };
    let tenant = cloud.tenant("a").await;
    let objects = Objects::make(&cloud, &tenant).await;
    let owner = tenant.key.as_str();
    // Only unscoped owners make keys, and no role is above owner, so create_key's "no more
    // rights than the maker" check cannot be reached through the API: the escalations that
    // exist are non-owners making keys or people, and limited keys making unlimited ones.
    let (_, operator_key) =
        make_key(&cloud, owner, json!({"name": "op", "role": "operator"})).await;
    let operator_session = person_session(&cloud, &tenant, Role::Operator).await;
    let (_, limited_owner) = make_key(
        &cloud,
        owner,
        json!({"name": "limited", "role": "owner", "site_id": objects.ids.site}),
    )
    .await;
    let attempts = [
        (
            Method::POST,
            "/v1/api-keys",
            json!({"name": "up", "role": "owner"}),
        ),
        (
            Method::POST,
            "/v1/api-keys",
            json!({"name": "same", "role": "operator"}),
        ),
        (
            Method::POST,
            "/v1/users",
            json!({"email": "boss@a.example", "role": "owner"}),
        ),
    ];
    for (who, token) in [
        ("an operator API key", operator_key.as_str()),
        ("an operator login session", operator_session.as_str()),
        ("an owner API key limited to a site", limited_owner.as_str()),
    ] {
        for (method, path, body) in &attempts {
            let (status, answer) = cloud
                .call(method.clone(), path, Some(token), Some(body.clone()))
                .await;
            assert_eq!(
                (status, answer["code"].as_str()),
                (StatusCode::FORBIDDEN, Some("forbidden")),
                "{who}: {method} {path} {body}: {answer}"
            );
        }
    }
    // A limited owner key cannot manage the tenant either.
    for (method, path) in [
        (Method::GET, "/v1/audit".to_string()),
        (Method::GET, "/v1/users".to_string()),
        (Method::GET, "/v1/api-keys".to_string()),
        (Method::DELETE, format!("/v1/api-keys/{}", objects.ids.key)),
        (Method::DELETE, format!("/v1/users/{}", objects.ids.user)),
    ] {
        let (status, answer) = cloud
            .call(method.clone(), &path, Some(&limited_owner), None)
            .await;
        assert_eq!(
            status,
            StatusCode::FORBIDDEN,
            "a limited owner key: {method} {path}: {answer}"
        );
    }
    let (status, keys) = get(&cloud, owner, "/v1/api-keys").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(keys.as_array().unwrap().len(), 4, "no key was made: {keys}");
    assert!(
        keys.as_array()
            .unwrap()
            .iter()
            .all(|k| k["revoked_at"].is_null()),
        "{keys}"
    );
    cloud.stop().await;
}

/// Sites S1 (gateways g1, g2; g2 labelled `line=3`) and S2 (gateway g3), each with readings.
struct Fleet {
    cloud: TestCloud,
    tenant: Tenant,
    s1: String,
    s2: String,
    g1: String,
    g2: String,
    g3: String,
}

impl Fleet {
    async fn new(backend: Backend) -> Option<Fleet> {
        let cloud = TestCloud::start(backend).await?;
        let tenant = cloud.tenant("a").await;
        let key = tenant.key.as_str();
        let (s1, token) = cloud.site_and_token(key, "plant-1").await;
        let g1 = cloud.enroll(&token, &s1, "gw-1").await;
        let g2 = cloud
            .enroll(&cloud.enrollment_token(key, &s1).await, &s1, "gw-2")
            .await;
        let (s2, token) = cloud.site_and_token(key, "plant-2").await;
        let g3 = cloud.enroll(&token, &s2, "gw-3").await;
        for gw in [&g1, &g2, &g3] {
            let (status, ack) = cloud.ingest(gw, &batch(&gw.id, "raw", 0, 99)).await;
            assert_eq!(status, StatusCode::OK, "{ack}");
        }
        let (status, labelled) = cloud
            .call(
                Method::PATCH,
                &format!("/v1/gateways/{}", g2.id),
                Some(key),
                Some(json!({"labels": {"line": "3"}})),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{labelled}");
        Some(Fleet {
            s1,
            s2,
            g1: g1.id,
            g2: g2.id,
            g3: g3.id,
            cloud,
            tenant,
        })
    }

    async fn series_of(&self, gateways: &[&str]) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for gw in gateways {
            out.extend(series_of(&self.cloud, &self.tenant.key, gw).await);
        }
        out
    }

    /// What `token` sees: exactly the gateways `visible` (and their series); the others and
    /// their series answer 404.
    async fn assert_sees_only(&self, who: &str, token: &str, visible: &[&str]) {
        let cloud = &self.cloud;
        let all = [self.g1.as_str(), self.g2.as_str(), self.g3.as_str()];
        let hidden: Vec<&str> = all.into_iter().filter(|g| !visible.contains(g)).collect();
        let expected: BTreeSet<String> = visible.iter().map(|g| g.to_string()).collect();
        assert_eq!(
            listed_ids(cloud, token, "/v1/gateways").await,
            expected,
            "{who}"
        );
        assert_eq!(
            listed_ids(cloud, token, "/v1/series").await,
            self.series_of(visible).await,
            "{who}"
        );
        for gw in visible {
            let (status, answer) = get(cloud, token, &format!("/v1/gateways/{gw}")).await;
            assert_eq!(status, StatusCode::OK, "{who}: {answer}");
        }
        for gw in &hidden {
            let (status, answer) = get(cloud, token, &format!("/v1/gateways/{gw}")).await;
            assert_not_found(status, &answer, &format!("{who}: GET gateway {gw}"));
            let path = format!("/v1/series?gateway_id={gw}");
            let listed = listed_ids(cloud, token, &path).await;
            assert!(listed.is_empty(), "{who}: GET {path}: {listed:?}");
            for series in self.series_of(&[gw]).await {
                for path in [
                    format!("/v1/series/{series}"),
                    format!("/v1/series/{series}/readings"),
                ] {
                    let (status, answer) = get(cloud, token, &path).await;
                    assert_not_found(status, &answer, &format!("{who}: GET {path} (of {gw})"));
                }
            }
        }
    }

    /// A limited operator key may not change gateways outside its scope: 404, and unchanged.
    async fn assert_cannot_change(&self, who: &str, token: &str, gateway: &str) {
        let cloud = &self.cloud;
        let patch = format!("/v1/gateways/{gateway}");
        let (status, answer) = cloud
            .call(
                Method::PATCH,
                &patch,
                Some(token),
                Some(json!({"labels": {"line": "3"}})),
            )
            .await;
        assert_not_found(status, &answer, &format!("{who}: PATCH {patch}"));
        let decommission = format!("/v1/gateways/{gateway}/decommission");
        let (status, answer) = cloud
            .call(Method::POST, &decommission, Some(token), None)
            .await;
        assert_not_found(status, &answer, &format!("{who}: POST {decommission}"));
        let (_, seen) = get(cloud, &self.tenant.key, &patch).await;
        assert_eq!(seen["status"], "active", "{seen}");
    }
}

async fn site_scoped_keys_see_only_their_site(backend: Backend) {
    let Some(f) = Fleet::new(backend).await else {
        return;
    };
    let cloud = &f.cloud;
    let owner = f.tenant.key.as_str();
    let (_, viewer) = make_key(
        cloud,
        owner,
        json!({"name": "s1", "role": "viewer", "site_id": f.s1}),
    )
    .await;
    let who = "a viewer key limited to site S1";
    f.assert_sees_only(who, &viewer, &[&f.g1, &f.g2]).await;
    assert!(
        listed_ids(cloud, &viewer, &format!("/v1/gateways?site_id={}", f.s2))
            .await
            .is_empty()
    );
    assert_eq!(
        listed_ids(cloud, &viewer, "/v1/sites").await,
        BTreeSet::from([f.s1.clone()])
    );
    let (status, answer) = get(cloud, &viewer, &format!("/v1/sites/{}", f.s2)).await;
    assert_not_found(status, &answer, &format!("{who}: GET site S2"));
    let (status, answer) = get(cloud, &viewer, &format!("/v1/sites/{}", f.s1)).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let (_, me) = get(cloud, &viewer, "/v1/me").await;
    assert_eq!(me["scope_site_id"].as_str(), Some(f.s1.as_str()), "{me}");

    let (_, operator) = make_key(
        cloud,
        owner,
        json!({"name": "s1-op", "role": "operator", "site_id": f.s1}),
    )
    .await;
    let who = "an operator key limited to site S1";
    f.assert_cannot_change(who, &operator, &f.g3).await;
    let tokens = [(&f.s2, StatusCode::NOT_FOUND), (&f.s1, StatusCode::CREATED)];
    for (site, expected) in tokens {
        let (status, answer) = cloud
            .call(
                Method::POST,
                "/v1/enrollment-tokens",
                Some(&operator),
                Some(json!({"site_id": site, "expires_in_hours": 1})),
            )
            .await;
        assert_eq!(
            status, expected,
            "{who}: an enrollment token for {site}: {answer}"
        );
    }
    let (status, answer) = cloud
        .call(
            Method::POST,
            "/v1/sites",
            Some(&operator),
            Some(json!({"name": "plant-3"})),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "{who}: POST /v1/sites: {answer}"
    );
    // Within its site the operator key works.
    let (status, answer) = cloud
        .call(
            Method::POST,
            &format!("/v1/gateways/{}/decommission", f.g1),
            Some(&operator),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{who}: decommission g1: {answer}");
    f.cloud.stop().await;
}

async fn label_scoped_keys_see_only_their_gateways(backend: Backend) {
    let Some(f) = Fleet::new(backend).await else {
        return;
    };
    let cloud = &f.cloud;
    let owner = f.tenant.key.as_str();
    let (_, viewer) = make_key(
        cloud,
        owner,
        json!({"name": "l3", "role": "viewer", "label": "line=3"}),
    )
    .await;
    let who = "a viewer key limited to label line=3";
    f.assert_sees_only(who, &viewer, &[&f.g2]).await;
    let listed = listed_ids(cloud, &viewer, &format!("/v1/gateways?site_id={}", f.s1)).await;
    assert_eq!(listed, BTreeSet::from([f.g2.clone()]), "{who}");
    let (_, me) = get(cloud, &viewer, "/v1/me").await;
    assert_eq!(me["scope_label"], "line=3", "{me}");

    let (_, operator) = make_key(
        cloud,
        owner,
        json!({"name": "l3-op", "role": "operator", "label": "line=3"}),
    )
    .await;
    let who = "an operator key limited to label line=3";
    f.assert_cannot_change(who, &operator, &f.g1).await;
    f.assert_cannot_change(who, &operator, &f.g3).await;
    let (_, g1) = get(cloud, owner, &format!("/v1/gateways/{}", f.g1)).await;
    assert_eq!(
        g1["labels"],
        json!({}),
        "{who} labelled g1 into its scope: {g1}"
    );
    f.cloud.stop().await;
}

/// A key limited to `line=3` relabels its own gateway away from `line=3`. Whether the service
/// allows that or refuses it, its answer must say what happened: an error answer for a change
/// that was committed (and audited) makes the caller retry, or believe nothing changed.
async fn a_scoped_keys_answer_tells_whether_its_change_was_made(backend: Backend) {
    let Some(f) = Fleet::new(backend).await else {
        return;
    };
    let cloud = &f.cloud;
    let owner = f.tenant.key.as_str();
    let (_, operator) = make_key(
        cloud,
        owner,
        json!({"name": "l3-op", "role": "operator", "label": "line=3"}),
    )
    .await;
    let path = format!("/v1/gateways/{}", f.g2);
    let (status, answer) = cloud
        .call(
            Method::PATCH,
            &path,
            Some(&operator),
            Some(json!({"labels": {"line": "4"}})),
        )
        .await;
    let (_, g2) = get(cloud, owner, &path).await;
    let changed = g2["labels"] == json!({"line": "4"});
    assert_eq!(
        status.is_success(),
        changed,
        "PATCH {path} by a key limited to line=3, moving the gateway out of its scope, answered \
         {status} {answer}, yet the gateway's labels are now {}",
        g2["labels"]
    );
    f.cloud.stop().await;
}

async fn revoked_and_expired_keys_are_refused(backend: Backend) {
    let Some(cloud) = TestCloud::start(backend).await else {
        return;
    };
    let tenant = cloud.tenant("a").await;
    let owner = tenant.key.as_str();
    let reads = ["/v1/me", "/v1/gateways", "/v1/sites", "/v1/series"];

    let (revoked_id, revoked) =
        make_key(&cloud, owner, json!({"name": "gone", "role": "viewer"})).await;
    assert_eq!(get(&cloud, &revoked, "/v1/me").await.0, StatusCode::OK);
    let path = format!("/v1/api-keys/{revoked_id}");
    let (status, answer) = cloud.call(Method::DELETE, &path, Some(owner), None).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{answer}");
    let (status, answer) = cloud.call(Method::DELETE, &path, Some(owner), None).await;
    assert_not_found(status, &answer, "revoking a revoked key");

    let (expired_id, expired) = make_key(
        &cloud,
        owner,
        json!({"name": "old", "role": "owner", "expires_in_days": 1}),
    )
    .await;
    assert_eq!(
        get(&cloud, &expired, "/v1/me").await.0,
        StatusCode::OK,
        "not expired yet"
    );
    sqlx::query("UPDATE api_keys SET expires_at = 1 WHERE id = $1")
        .bind(&expired_id)
        .execute(&cloud.db().pool)
        .await
        .unwrap();

    // A valid key id with a secret that is not the key's.
    let forged = format!("{}.{}", owner.rsplit_once('.').unwrap().0, "0".repeat(64));
    let session = login(
        &cloud,
        &tenant.name,
        &tenant.owner_email,
        &tenant.owner_password,
    )
    .await;
    let (status, _) = cloud
        .call(Method::POST, "/v1/auth/logout", Some(&session), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);

    for (who, token) in [
        ("a revoked key", revoked.as_str()),
        ("an expired key", expired.as_str()),
        ("a forged key", forged.as_str()),
        ("an ended session", session.as_str()),
    ] {
        for path in reads {
            let (status, answer) = get(&cloud, token, path).await;
            assert_eq!(
                (status, answer["code"].as_str()),
                (StatusCode::UNAUTHORIZED, Some("unauthorized")),
                "{who}: GET {path}: {answer}"
            );
        }
        let (status, answer) = cloud
            .call(
                Method::POST,
                "/v1/sites",
                Some(token),
                Some(json!({"name": "x"})),
            )
            .await;
        assert_eq!(
            status,
            StatusCode::UNAUTHORIZED,
            "{who}: POST /v1/sites: {answer}"
        );
    }
    assert!(listed_ids(&cloud, owner, "/v1/sites").await.is_empty());
    cloud.stop().await;
}

async fn changes_are_audited_with_actor_and_source_ip(backend: Backend) {
    let Some(w) = World::new(backend).await else {
        return;
    };
    let cloud = &w.cloud;
    w.a_reaches_for_bs_objects().await;

    let b = &w.b;
    let (status, page) = get(cloud, &b.tenant.key, "/v1/audit").await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let entries = page["entries"].as_array().unwrap();
    let b_key = format!("key:{}", key_id(&b.tenant.key));
    let ids = &b.objects.ids;
    let gateway_actor = format!("gateway:{}", ids.gateway);
    for (action, object, actor) in [
        ("site.create", &ids.site, &b_key),
        ("gateway.enroll", &ids.gateway, &gateway_actor),
        ("gateway.update", &ids.gateway, &b_key),
        ("enrollment_token.create", &b.objects.spare_token, &b_key),
        ("api_key.create", &ids.key, &b_key),
        ("user.create", &ids.user, &b_key),
    ] {
        let entry = entries
            .iter()
            .find(|e| e["action"] == action && e["object"] == object.as_str())
            .unwrap_or_else(|| panic!("no {action} of {object} in tenant B's audit: {page}"));
        assert_eq!(entry["actor"], actor.as_str(), "{entry}");
        assert_eq!(entry["source_ip"], "127.0.0.1", "{entry}");
        assert!(entry["at"].as_i64().unwrap() > 0, "{entry}");
    }
    // A's attempts left nothing in B's log, and changed nothing that would be logged.
    let a_actors = [
        format!("key:{}", key_id(&w.a.tenant.key)),
        actor_of(cloud, &w.a.session).await,
    ];
    for entry in entries {
        assert!(
            !a_actors.iter().any(|a| entry["actor"] == a.as_str()),
            "{entry}"
        );
        let action = entry["action"].as_str().unwrap();
        assert!(
            !["gateway.decommission", "user.delete", "api_key.revoke"].contains(&action),
            "{entry}"
        );
    }

    // A session's changes are logged as the person.
    let owner_actor = actor_of(cloud, &b.session).await;
    assert!(owner_actor.starts_with("user:"), "{owner_actor}");
    let (status, site) = cloud
        .call(
            Method::POST,
            "/v1/sites",
            Some(&b.session),
            Some(json!({"name": "plant-9"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{site}");
    let (_, page) = get(cloud, &b.session, "/v1/audit?limit=1").await;
    let newest = &page["entries"][0];
    assert_eq!(
        (
            &newest["action"],
            &newest["object"],
            &newest["actor"],
            &newest["source_ip"]
        ),
        (
            &json!("site.create"),
            &site["id"],
            &json!(owner_actor),
            &json!("127.0.0.1")
        ),
        "{page}"
    );
    w.cloud.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Helpers

fn text(value: &Json) -> String {
    value
        .as_str()
        .unwrap_or_else(|| panic!("not a string: {value}"))
        .to_string()
}

#[track_caller]
fn assert_not_found(status: StatusCode, answer: &Json, context: &str) {
    assert_eq!(
        (status, answer["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found")),
        "{context}: {answer}"
    );
}

async fn get(cloud: &TestCloud, token: &str, path: &str) -> (StatusCode, Json) {
    cloud.call(Method::GET, path, Some(token), None).await
}

/// Call a route of a table with its `{…}` filled with `ids`.
async fn call_route(
    cloud: &TestCloud,
    token: &str,
    method: &Method,
    path: &str,
    body: &Option<Json>,
    ids: &Ids,
) -> (StatusCode, Json) {
    let body = body.as_ref().map(|b| ids.fill_json(b));
    cloud
        .call(method.clone(), &ids.fill(path), Some(token), body)
        .await
}

/// The ids of a list's items (a JSON array, or the array inside a page).
async fn listed_ids(cloud: &TestCloud, token: &str, path: &str) -> BTreeSet<String> {
    let (status, answer) = get(cloud, token, path).await;
    assert_eq!(status, StatusCode::OK, "GET {path}: {answer}");
    let items = answer
        .as_array()
        .or_else(|| answer.as_object()?.values().find_map(Json::as_array))
        .unwrap_or_else(|| panic!("GET {path} is not a list: {answer}"));
    items.iter().map(|item| text(&item["id"])).collect()
}

async fn series_of(cloud: &TestCloud, token: &str, gateway: &str) -> Vec<String> {
    let ids: Vec<String> = listed_ids(cloud, token, &format!("/v1/series?gateway_id={gateway}"))
        .await
        .into_iter()
        .collect();
    assert!(!ids.is_empty(), "gateway {gateway} has no series");
    ids
}

/// Make an API key; returns its id and secret.
async fn make_key(cloud: &TestCloud, token: &str, request: Json) -> (String, String) {
    let (status, made) = cloud
        .call(Method::POST, "/v1/api-keys", Some(token), Some(request))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{made}");
    (text(&made["key"]["id"]), text(&made["secret"]))
}

/// The id inside an API key secret (`fgk_<id>.<secret>`).
fn key_id(secret: &str) -> &str {
    secret
        .strip_prefix("fgk_")
        .and_then(|rest| rest.split_once('.'))
        .map(|(id, _)| id)
        .expect("an API key")
}

async fn login(cloud: &TestCloud, tenant: &str, email: &str, password: &str) -> String {
    let (status, answer) = cloud
        .call(
            Method::POST,
            "/v1/auth/login",
            None,
            Some(json!({"tenant": tenant, "email": email, "password": password})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    text(&answer["token"])
}

/// A new person of `role` in the tenant, logged in.
async fn person_session(cloud: &TestCloud, tenant: &Tenant, role: Role) -> String {
    let email = format!("{}@{}.example", role.as_str(), tenant.name);
    let (status, made) = cloud
        .call(
            Method::POST,
            "/v1/users",
            Some(&tenant.key),
            Some(json!({"email": email, "role": role})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{made}");
    login(cloud, &tenant.name, &email, &text(&made["password"])).await
}

/// The audit actor of a token (`user:…` or `key:…`).
async fn actor_of(cloud: &TestCloud, token: &str) -> String {
    let (status, me) = get(cloud, token, "/v1/me").await;
    assert_eq!(status, StatusCode::OK, "{me}");
    text(&me["actor"])
}
