//! The OpenAPI 3.0 document served at `/v1/openapi.json`, describing every route.

use serde_json::{json, Value};

fn error_responses(codes: &[&str]) -> Value {
    let mut m = serde_json::Map::new();
    for code in codes {
        let desc = match *code {
            "400" => "Invalid request (body, key or path); nothing changed.",
            "401" => "Missing or wrong bearer token.",
            "403" => "Request carried Origin or Referer.",
            "404" => "No such object.",
            "409" => "Conflicts with the current state (duplicate, still referenced, or a newly pinned listen_port the node cannot bind).",
            "412" => "If-Match names a generation that is no longer current.",
            "413" => "Request body too large.",
            "428" => "If-Match is required.",
            "500" => "The new state could not be persisted (nothing changed), or it was applied but its directory could not be synced (the message says which).",
            _ => "Error.",
        };
        m.insert(
            (*code).into(),
            json!({"description": desc, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}),
        );
    }
    Value::Object(m)
}

fn merge(mut a: Value, b: Value) -> Value {
    if let (Some(a), Value::Object(b)) = (a.as_object_mut(), b) {
        a.extend(b);
    }
    a
}

/// The document.
pub fn document() -> Value {
    let key = json!({"type": "string", "description": "WireGuard key, standard base64 (44 characters) as `wg` prints it", "pattern": "^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=$"});
    let key_path = json!({"name": "key", "in": "path", "required": true, "description": "The key in base64url (`-` for `+`, `_` for `/`, padding optional)", "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{42}[AEIMQUYcgkosw048]=?$"}});
    let common = ["401", "403"];
    json!({
        "openapi": "3.0.3",
        "info": {"title": "WraithGate node API", "version": env!("CARGO_PKG_VERSION"),
                 "description": "Operator API of a WraithGate relay node. Every route but /healthz and /readyz needs `Authorization: Bearer <token>` (the read-only metrics.token opens GET /metrics only); requests carrying Origin or Referer are refused."},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
                "Change": {"type": "object", "description": "What a change did (or, dry_run, would do)", "properties": {
                    "generation": {"type": "integer"}, "changed": {"type": "boolean"}, "dry_run": {"type": "boolean"},
                    "changes": {"type": "object", "properties": {
                        "exits_added": {"type": "array", "items": {"type": "string"}}, "exits_removed": {"type": "array", "items": {"type": "string"}},
                        "exits_changed": {"type": "array", "items": {"type": "string"}}, "peers_added": {"type": "array", "items": {"type": "string"}},
                        "peers_removed": {"type": "array", "items": {"type": "string"}}, "peers_changed": {"type": "array", "items": {"type": "string"}}}},
                    "sessions_closed": {"type": "array", "items": {"type": "object", "properties": {
                        "exit": {"type": "string"}, "exit_key": {"type": "string"}, "sessions": {"type": "integer"}}}},
                    "exit": {"type": "object"}, "exits": {"type": "integer"}, "peers": {"type": "integer"}}},
                "Key": key,
                "Exit": {"type": "object", "required": ["public_key", "endpoint", "name"], "additionalProperties": false,
                    "properties": {
                        "public_key": {"$ref": "#/components/schemas/Key"},
                        "endpoint": {"type": "string", "description": "ip:port ([v6]:port), or host:port resolved when the change is applied (POST, PATCH; PUT /v1/config takes addresses)", "example": "192.0.2.10:51820"},
                        "name": {"type": "string", "minLength": 1, "maxLength": 64},
                        "listen_port": {"type": "integer", "minimum": 1, "maximum": 65535, "nullable": true}
                    }},
                "Peer": {"type": "object", "required": ["public_key", "allowed_ips"], "additionalProperties": false,
                    "properties": {
                        "public_key": {"$ref": "#/components/schemas/Key"},
                        "name": {"type": "string", "maxLength": 64},
                        "allowed_ips": {"type": "array", "minItems": 1, "items": {"type": "string", "example": "10.0.0.2/32"}},
                        "preshared_key": {"type": "string", "pattern": "^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=$", "nullable": true, "description": "Write-only: never shown. In PUT /v1/config a peer that leaves it out keeps the preshared key the node holds for its public key (so a state from GET /v1/config can be applied as it is); null removes it; a key sets it."},
                        "allowed_exits": {"type": "array", "items": {"$ref": "#/components/schemas/Key"}}
                    }},
                "Config": {"type": "object", "additionalProperties": false, "properties": {
                    "generation": {"type": "integer", "minimum": 0, "maximum": u64::MAX, "nullable": true, "description": "Ignored on PUT; use If-Match."},
                    "exits": {"type": "array", "items": {"$ref": "#/components/schemas/Exit"}},
                    "peers": {"type": "array", "items": {"$ref": "#/components/schemas/Peer"}}
                }},
                "NodeFastPath": {"type": "object", "nullable": true, "description": "The kernel fast path when attached (null: off, or it could not attach; the log says why).", "properties": {
                    "interfaces": {"type": "array", "items": {"type": "string"}}, "offloaded": {"type": "integer"}}},
                "Traffic": {"type": "object", "properties": {"packets": {"type": "integer"}, "bytes": {"type": "integer"}}},
                "Session": {"type": "object", "properties": {
                    "id": {"type": "string", "example": "0.12.3"},
                    "worker": {"type": "integer"},
                    "client": {"type": "string"},
                    "exit": {"type": "string"},
                    "exit_key": {"$ref": "#/components/schemas/Key"},
                    "exit_endpoint": {"type": "string"},
                    "listen_port": {"type": "integer"},
                    "established": {"type": "boolean"},
                    "verified": {"type": "boolean"},
                    "to_exit": {"$ref": "#/components/schemas/Traffic"},
                    "to_client": {"$ref": "#/components/schemas/Traffic"},
                    "fast_path": {"type": "object", "description": "The kernel fast path's share of to_exit and to_client (included in them), and whether it forwards this session now.", "properties": {
                        "offloaded": {"type": "boolean"},
                        "to_exit": {"$ref": "#/components/schemas/Traffic"},
                        "to_client": {"$ref": "#/components/schemas/Traffic"}}},
                    "handshakes": {"type": "integer"},
                    "age_secs": {"type": "number"},
                    "idle_secs": {"type": "number"}
                }}
            }
        },
        "security": [{"bearer": []}],
        "paths": {
            "/healthz": {"get": {"summary": "Liveness: every data-plane worker keeps publishing", "security": [],
                "responses": merge(json!({"200": {"description": "Alive", "content": {"text/plain": {"schema": {"type": "string"}}}},
                    "503": {"description": "A worker stalled (named)", "content": {"text/plain": {"schema": {"type": "string"}}}}}), error_responses(&["403"]))}},
            "/readyz": {"get": {"summary": "Readiness: every data-plane worker serves", "security": [],
                "responses": merge(json!({"200": {"description": "Ready", "content": {"text/plain": {"schema": {"type": "string"}}}},
                    "503": {"description": "Starting, or a worker stalled", "content": {"text/plain": {"schema": {"type": "string"}}}}}), error_responses(&["403"]))}},
            "/metrics": {"get": {"summary": "Prometheus metrics",
                "responses": merge(json!({"200": {"description": "Prometheus text format 0.0.4", "content": {"text/plain": {"schema": {"type": "string"}}}}}), error_responses(&common))}},
            "/v1/openapi.json": {"get": {"summary": "This document",
                "responses": merge(json!({"200": {"description": "OpenAPI 3.0", "content": {"application/json": {"schema": {"type": "object"}}}}}), error_responses(&common))}},
            "/v1/node": {"get": {"summary": "The node: its public key (Z-HOP peers' outer peer), backend, workers, listen addresses, counts",
                "responses": merge(json!({"200": {"description": "Node", "content": {"application/json": {"schema": {"type": "object", "properties": {
                    "public_key": {"$ref": "#/components/schemas/Key"}, "version": {"type": "string"}, "backend": {"type": "string"},
                    "workers": {"type": "integer"}, "listen": {"type": "array", "items": {"type": "string"}}, "generation": {"type": "integer"},
                    "exits": {"type": "integer"}, "peers": {"type": "integer"}, "sessions": {"type": "integer"}, "zhop_peers": {"type": "integer"},
                    "fast_path": {"$ref": "#/components/schemas/NodeFastPath"},
                    "fast_path_refused": {"type": "string", "nullable": true, "description": "Why fast_path = \"auto\" runs without it (null: attached, or off)."},
                    "uptime_secs": {"type": "integer"}}}}}}}), error_responses(&common))}},
            "/v1/exits": {
                "get": {"summary": "List exits",
                    "responses": merge(json!({"200": {"description": "Exits", "content": {"application/json": {"schema": {"type": "array", "items": {"$ref": "#/components/schemas/Exit"}}}}}}), error_responses(&common))},
                "post": {"summary": "Add an exit",
                    "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Exit"}}}},
                    "responses": merge(json!({"201": {"description": "Added", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Exit"}}}}}), error_responses(&["400", "401", "403", "409", "413", "500"]))}
            },
            "/v1/exits/{key}": {"delete": {"summary": "Remove an exit; its sessions end", "parameters": [key_path],
                "responses": merge(json!({"204": {"description": "Removed"}}), error_responses(&["400", "401", "403", "404", "409", "500"]))},
                "patch": {"summary": "Change one exit: name, endpoint, listen_port (null unpins); a new endpoint ends the exit's sessions", "parameters": [key_path],
                    "requestBody": {"required": true, "content": {"application/json": {"schema": {"type": "object", "additionalProperties": false, "properties": {
                        "name": {"type": "string"}, "endpoint": {"type": "string"}, "listen_port": {"type": ["integer", "null"]}}}}}},
                    "responses": merge(json!({"200": {"description": "Changed (or already so: changed is false)", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Change"}}}}}), error_responses(&["400", "401", "403", "404", "409", "413", "500"]))}},
            "/v1/peers": {
                "get": {"summary": "List provisioned peers (preshared keys are never shown)",
                    "responses": merge(json!({"200": {"description": "Peers", "content": {"application/json": {"schema": {"type": "array", "items": {"$ref": "#/components/schemas/Peer"}}}}}}), error_responses(&common))},
                "post": {"summary": "Provision a peer",
                    "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Peer"}}}},
                    "responses": merge(json!({"201": {"description": "Added", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Peer"}}}}}), error_responses(&["400", "401", "403", "409", "413", "500"]))}
            },
            "/v1/peers/{key}": {"delete": {"summary": "Remove a peer", "parameters": [key_path],
                "responses": merge(json!({"204": {"description": "Removed"}}), error_responses(&["400", "401", "403", "404", "500"]))}},
            "/v1/config": {
                "get": {"summary": "The whole desired state; ETag is its generation",
                    "responses": merge(json!({"200": {"description": "State", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Config"}}}}}), error_responses(&common))},
                "put": {"summary": "Replace the whole desired state atomically",
                    "description": "Peers that leave preshared_key out keep the one stored for their public key; an explicit null removes it.",
                    "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Config"}}}},
                    "parameters": [{"name": "If-Match", "in": "header", "required": true, "description": "The generation this change is based on", "schema": {"type": "string", "pattern": "^\"?[0-9]{1,19}\"?$"}},
                        {"name": "dry_run", "in": "query", "required": false, "description": "true: check the state and answer what would change, changing nothing", "schema": {"type": "boolean"}}],
                    "responses": merge(json!({"200": {"description": "Applied (ETag is the generation, unchanged when the state was already so), or what a dry run would change", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Change"}}}}}), error_responses(&["400", "401", "403", "409", "412", "413", "428", "500"]))}
            },
            "/v1/sessions": {"get": {"summary": "Live sessions (no payload, ever)",
                "responses": merge(json!({"200": {"description": "Sessions", "content": {"application/json": {"schema": {"type": "array", "items": {"$ref": "#/components/schemas/Session"}}}}}}), error_responses(&common))}},
            "/v1/sessions/{id}": {"delete": {"summary": "Close a session",
                "parameters": [{"name": "id", "in": "path", "required": true, "description": "worker.index.generation, as listed", "schema": {"type": "string", "pattern": "^[0-9]{1,9}\\.[0-9]{1,9}\\.[0-9]{1,9}$"}}],
                "responses": merge(json!({"204": {"description": "Closed"}}), error_responses(&["400", "401", "403", "404"]))}}
        }
    })
}
