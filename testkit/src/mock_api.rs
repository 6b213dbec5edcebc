//! The API server of the agent's and the operator's reconcile tests: a tower-test mock behind a
//! real `kube::Client`, played by the test one request at a time, so each test states the exact
//! requests (method, path and query, content type, body) in their order.

use std::time::Duration;

use http::{Request, Response, StatusCode};
use kube::{client::Body, Client};
use serde_json::{json, Value};
use tower_test::mock::{self, Handle, SendResponse};

/// The test's end of the mock API server.
pub type ApiHandle = Handle<Request<Body>, Response<Body>>;

/// How long a test waits for the next request of the code under test before failing.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A client (default namespace `default`) whose API server is the returned handle.
pub fn client() -> (Client, ApiHandle) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(service, "default"), handle)
}

/// The next request: method, path and query, content type, JSON body (Null when empty), and
/// where to send the answer. Fails after [`REQUEST_TIMEOUT`].
pub async fn next(handle: &mut ApiHandle) -> (String, String, Option<String>, Value, SendResponse<Response<Body>>) {
    let (request, send) = tokio::time::timeout(REQUEST_TIMEOUT, handle.next_request())
        .await
        .expect("the code under test sends another request")
        .expect("the client is alive");
    let (parts, body) = request.into_parts();
    let bytes = body.collect_bytes().await.unwrap();
    let body = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap() };
    let content_type = parts.headers.get("content-type").map(|v| v.to_str().unwrap().to_string());
    (parts.method.to_string(), parts.uri.to_string(), content_type, body, send)
}

/// Answer a request with `status` and `body` as JSON.
pub fn respond(send: SendResponse<Response<Body>>, status: StatusCode, body: &Value) {
    let bytes = serde_json::to_vec(body).unwrap();
    send.send_response(Response::builder().status(status).body(Body::from(bytes)).unwrap());
}

/// Answer a request with the API server's 404 `Status` for `kind` `name`.
pub fn not_found(send: SendResponse<Response<Body>>, kind: &str, name: &str) {
    let status = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("{kind} \"{name}\" not found"), "reason": "NotFound", "code": 404
    });
    respond(send, StatusCode::NOT_FOUND, &status);
}

/// Expect a GET of `uri` and answer `body`.
pub async fn expect_get(handle: &mut ApiHandle, uri: &str, body: Value) {
    let (method, got, _, _, send) = next(handle).await;
    assert_eq!((method.as_str(), got.as_str()), ("GET", uri));
    respond(send, StatusCode::OK, &body);
}

/// Expect a server-side apply of the status subresource at `uri` (path and query) of an object
/// of `kind`, carrying only `apiVersion`, `kind` and `status`; answer `object` with that status;
/// return the status sent.
pub async fn expect_status_apply(handle: &mut ApiHandle, uri: &str, kind: &str, object: &Value) -> Value {
    let (method, got, content_type, body, send) = next(handle).await;
    assert_eq!((method.as_str(), got.as_str()), ("PATCH", uri));
    assert_eq!(content_type.as_deref(), Some("application/apply-patch+yaml"));
    assert_eq!(body["apiVersion"], "livepatch.dev/v1alpha1");
    assert_eq!(body["kind"], kind);
    assert_eq!(body.as_object().unwrap().len(), 3, "only apiVersion, kind and status: {body}");
    let mut answer = object.clone();
    answer["status"] = body["status"].clone();
    respond(send, StatusCode::OK, &answer);
    body["status"].clone()
}
