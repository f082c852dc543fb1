//! `docs/openapi.json` is the OpenAPI document the code generates. When a
//! route changes, regenerate it with `UPDATE_OPENAPI=1 scripts/test openapi`.

#[test]
fn the_committed_openapi_document_matches_the_code() {
    let generated = serde_json::to_string_pretty(&souk_api::app::openapi()).unwrap() + "\n";
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json");
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(path, &generated).unwrap();
    }
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        committed == generated,
        "docs/openapi.json is out of date: run `UPDATE_OPENAPI=1 scripts/test openapi` and commit it"
    );
}

/// A parameter is said to be in the path exactly when it is a `{name}` of
/// that path (query structs once all showed up as required path parameters).
#[test]
fn every_parameter_is_where_the_route_takes_it() {
    let doc = serde_json::to_value(souk_api::app::openapi()).unwrap();
    let mut misplaced = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            for p in operation["parameters"].as_array().into_iter().flatten() {
                let name = p["name"].as_str().unwrap();
                let in_path = path.contains(&format!("{{{name}}}"));
                if (p["in"] == "path") != in_path {
                    misplaced.push(format!("{method} {path}: {name} in {}", p["in"]));
                }
            }
        }
    }
    assert!(misplaced.is_empty(), "{misplaced:#?}");
}
