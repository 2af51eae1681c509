//! Answers for the RPCs Keel does not serve: Unimplemented with a message that names the call,
//! so a client (or its operator) sees what is missing instead of grpc's empty answer. etcd
//! RPCs whose issue has not landed say so; anything else gets grpc-go's own text, as etcd
//! gives it ("unknown service X", "unknown method M for service X").

/// etcd v3 RPCs not served yet, by service. Each one leaves this list when its issue lands.
const NOT_YET: &[(&str, &[&str])] = &[(
    "etcdserverpb.Auth",
    &[
        "AuthEnable",
        "AuthDisable",
        "AuthStatus",
        "Authenticate",
        "UserAdd",
        "UserGet",
        "UserList",
        "UserDelete",
        "UserChangePassword",
        "UserGrantRole",
        "UserRevokeRole",
        "RoleAdd",
        "RoleGet",
        "RoleList",
        "RoleDelete",
        "RoleGrantPermission",
        "RoleRevokePermission",
    ],
)];

/// The services Keel serves and their methods: a call to another method of one of them gets
/// grpc-go's "unknown method" text (tonic's generated routers answer it with no message).
const SERVED: &[(&str, &[&str])] = &[
    (
        "etcdserverpb.KV",
        &[
            "Range",
            "Put",
            "DeleteRange",
            "Txn",
            "Compact",
            "RangeStream",
        ],
    ),
    ("etcdserverpb.Watch", &["Watch"]),
    (
        "etcdserverpb.Lease",
        &[
            "LeaseGrant",
            "LeaseRevoke",
            "LeaseKeepAlive",
            "LeaseTimeToLive",
            "LeaseLeases",
        ],
    ),
    (
        "etcdserverpb.Cluster",
        &[
            "MemberAdd",
            "MemberRemove",
            "MemberUpdate",
            "MemberList",
            "MemberPromote",
        ],
    ),
    (
        "etcdserverpb.Maintenance",
        &[
            "Alarm",
            "Status",
            "Defragment",
            "Hash",
            "HashKV",
            "Snapshot",
            "MoveLeader",
            "Downgrade",
        ],
    ),
    ("v3lockpb.Lock", &["Lock", "Unlock"]),
    (
        "v3electionpb.Election",
        &["Campaign", "Proclaim", "Leader", "Observe", "Resign"],
    ),
    ("grpc.health.v1.Health", &["Check", "Watch"]),
];

/// Whether `path` names a method of a served service that it does not have.
fn unknown_method_of_served(path: &str) -> bool {
    let Some((service, method)) = path.strip_prefix('/').and_then(|p| p.split_once('/')) else {
        return false;
    };
    SERVED
        .iter()
        .any(|(s, methods)| *s == service && !methods.contains(&method))
}

/// The Unimplemented message for a call to `path` (`/package.Service/Method`).
pub fn message(path: &str) -> String {
    let Some((service, method)) = path.strip_prefix('/').and_then(|p| p.split_once('/')) else {
        return format!("malformed method name: {path:?}");
    };
    let not_yet = NOT_YET
        .iter()
        .any(|(s, methods)| *s == service && methods.contains(&method));
    if not_yet {
        format!("keel: {service}/{method} is not implemented yet")
    } else if NOT_YET.iter().chain(SERVED).any(|(s, _)| *s == service) {
        format!("unknown method {method} for service {service}")
    } else {
        format!("unknown service {service}")
    }
}

async fn answer(uri: http::Uri) -> http::Response<tonic::body::Body> {
    tonic::Status::unimplemented(message(uri.path())).into_http()
}

/// What a learner serves (etcd's isRPCSupportedForLearner; Range only when serializable, which
/// the backend checks).
const LEARNER_SERVES: &[&str] = &["/etcdserverpb.Maintenance/Status", "/etcdserverpb.KV/Range"];

/// etcd's gRPC metadata asking that a call fail rather than wait when the member has no leader
/// (clientv3's WithRequireLeader: etcdctl's watch, kube-apiserver's watches).
const REQUIRE_LEADER_KEY: &str = "hasleader";
const REQUIRE_LEADER_VALUE: &str = "true";
/// etcd cancels a stream that asked for a leader once its member has had none for this many
/// election timeouts in a row (its maxNoLeaderCnt).
const NO_LEADER_TIMEOUTS: u32 = 3;
/// The streaming calls (etcd's stream interceptor watches these).
const STREAMS: &[&str] = &[
    "/etcdserverpb.Watch/Watch",
    "/etcdserverpb.Lease/LeaseKeepAlive",
    "/etcdserverpb.Maintenance/Snapshot",
    "/etcdserverpb.KV/RangeStream",
    "/v3electionpb.Election/Observe",
];

/// What the layer in front of every call asks of the member.
pub struct Gate {
    pub learner: std::sync::Arc<dyn Fn() -> bool + Send + Sync>,
    pub has_leader: std::sync::Arc<dyn Fn() -> bool + Send + Sync>,
    pub election_timeout: std::time::Duration,
}

fn no_leader() -> tonic::Status {
    tonic::Status::unavailable("etcdserver: no leader")
}

/// How much sooner than its deadline a call is answered as past it here, so this answer (not
/// tonic's own "Timeout expired", Canceled, around the same layer) is the one sent.
const DEADLINE_MARGIN: std::time::Duration = std::time::Duration::from_millis(2);

/// The call's deadline from its `grpc-timeout` header (gRPC's format: up to 8 digits and a
/// unit, H M S m u n).
fn grpc_timeout(headers: &http::HeaderMap) -> Option<std::time::Duration> {
    use std::time::Duration;
    let v = headers.get("grpc-timeout")?.to_str().ok()?;
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Routes every call the router does not serve to `answer`, answers unknown methods of served
/// services the same way, and, while the member is a learner, every call a learner does not
/// serve (streams included) with etcd's "rpc not supported for learner". A call that asks for a
/// leader (`hasleader: true`) is refused with etcd's "no leader" while the member has none,
/// and a stream that asked is ended so once the member has had none for
/// `NO_LEADER_TIMEOUTS` election timeouts (as etcd's interceptors do). A call still waiting
/// at its deadline is answered as etcd's (grpc-go's) are: DeadlineExceeded, "context deadline
/// exceeded". One layer checks all.
pub fn route(router: &mut axum::Router, gate: Gate) {
    let r = std::mem::take(router);
    let gate = std::sync::Arc::new(gate);
    *router = r.fallback(answer).layer(axum::middleware::from_fn(
        move |req: axum::extract::Request, next: axum::middleware::Next| {
            let path = req.uri().path();
            let wants_leader = req
                .headers()
                .get(REQUIRE_LEADER_KEY)
                .is_some_and(|v| v == REQUIRE_LEADER_VALUE);
            let refused = if (gate.learner)() && !LEARNER_SERVES.contains(&path) {
                Some(tonic::Status::unavailable(
                    "etcdserver: rpc not supported for learner",
                ))
            } else if unknown_method_of_served(path) {
                Some(tonic::Status::unimplemented(message(path)))
            } else if wants_leader && !(gate.has_leader)() {
                Some(no_leader())
            } else {
                None
            };
            let watched = (wants_leader && STREAMS.contains(&path)).then(|| gate.clone());
            let timeout = grpc_timeout(req.headers());
            async move {
                if let Some(status) = refused {
                    let answer: http::Response<axum::body::Body> = status.into_http();
                    return answer;
                }
                let resp = match timeout {
                    None => next.run(req).await,
                    Some(t) => {
                        let limit = t.saturating_sub(DEADLINE_MARGIN);
                        match tokio::time::timeout(limit, next.run(req)).await {
                            Ok(resp) => resp,
                            Err(_) => {
                                let status =
                                    tonic::Status::deadline_exceeded("context deadline exceeded");
                                return status.into_http();
                            }
                        }
                    }
                };
                match watched {
                    Some(gate) => {
                        resp.map(|body| axum::body::Body::new(LeaderWatch::new(body, &gate)))
                    }
                    None => resp,
                }
            }
        },
    ));
}

/// A stream's body that ends with etcd's "no leader" once the member has had no leader for
/// `NO_LEADER_TIMEOUTS` checks in a row, one per election timeout (dropping the call's own
/// stream, which ends its work).
struct LeaderWatch {
    inner: Option<axum::body::Body>,
    has_leader: std::sync::Arc<dyn Fn() -> bool + Send + Sync>,
    check: tokio::time::Interval,
    misses: u32,
}

impl LeaderWatch {
    fn new(inner: axum::body::Body, gate: &Gate) -> LeaderWatch {
        let every = gate.election_timeout;
        let mut check = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        LeaderWatch {
            inner: Some(inner),
            has_leader: gate.has_leader.clone(),
            check,
            misses: 0,
        }
    }
}

impl http_body::Body for LeaderWatch {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        use std::task::Poll;
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match std::pin::Pin::new(inner).poll_frame(cx) {
            Poll::Pending => {}
            Poll::Ready(None) => {
                self.inner = None;
                return Poll::Ready(None);
            }
            ready => return ready,
        }
        while self.check.poll_tick(cx).is_ready() {
            self.misses = if (self.has_leader)() {
                0
            } else {
                self.misses + 1
            };
            if self.misses >= NO_LEADER_TIMEOUTS {
                // The call's stream goes now: its work stops with it.
                self.inner = None;
                let mut trailers = http::HeaderMap::new();
                for (k, v) in no_leader().into_http::<()>().headers() {
                    if k.as_str().starts_with("grpc-") {
                        trailers.insert(k.clone(), v.clone());
                    }
                }
                return Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers))));
            }
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_call() {
        assert_eq!(
            message("/etcdserverpb.Auth/UserList"),
            "keel: etcdserverpb.Auth/UserList is not implemented yet"
        );
        assert_eq!(
            message("/etcdserverpb.Auth/RoleList"),
            "keel: etcdserverpb.Auth/RoleList is not implemented yet"
        );
        assert_eq!(
            message("/etcdserverpb.Auth/Nope"),
            "unknown method Nope for service etcdserverpb.Auth"
        );
        assert_eq!(message("/foo.Bar/Baz"), "unknown service foo.Bar");
        assert_eq!(
            message("/etcdserverpb.Watch/Nope"),
            "unknown method Nope for service etcdserverpb.Watch"
        );
        assert!(unknown_method_of_served("/etcdserverpb.KV/Nope"));
        assert!(!unknown_method_of_served("/etcdserverpb.KV/Range"));
        assert!(!unknown_method_of_served("/etcdserverpb.Auth/UserList"));
        assert_eq!(message("/nothing"), "malformed method name: \"/nothing\"");
    }

    #[test]
    fn grpc_timeouts_parse_as_grpc_writes_them() {
        use std::time::Duration;
        let parse = |v: &str| {
            let mut h = http::HeaderMap::new();
            h.insert("grpc-timeout", v.parse().unwrap());
            grpc_timeout(&h)
        };
        assert_eq!(parse("4999870u"), Some(Duration::from_micros(4999870)));
        assert_eq!(parse("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse("7n"), Some(Duration::from_nanos(7)));
        assert_eq!(parse("5"), None);
        assert_eq!(parse("123456789S"), None, "more than 8 digits");
        assert_eq!(parse("1x"), None);
        assert_eq!(grpc_timeout(&http::HeaderMap::new()), None);
    }

    /// A call still running at its deadline is answered DeadlineExceeded with grpc-go's words
    /// (etcd's), before it; one that finishes in time is answered by its service.
    #[tokio::test]
    async fn a_call_past_its_deadline_is_answered_as_etcd_answers_it() {
        use tonic::codegen::Service;
        let slow = |d: u64| async move {
            tokio::time::sleep(std::time::Duration::from_millis(d)).await;
            tonic::Status::ok("done").into_http::<axum::body::Body>()
        };
        let mut router = axum::Router::new()
            .route(
                "/etcdserverpb.KV/Range",
                axum::routing::post(move || slow(1000)),
            )
            .route(
                "/etcdserverpb.KV/Put",
                axum::routing::post(move || slow(10)),
            );
        route(
            &mut router,
            Gate {
                learner: std::sync::Arc::new(|| false),
                has_leader: std::sync::Arc::new(|| true),
                election_timeout: std::time::Duration::from_secs(1),
            },
        );
        for (path, status) in [
            (
                "/etcdserverpb.KV/Range",
                Some(("4", "context deadline exceeded")),
            ),
            ("/etcdserverpb.KV/Put", None),
        ] {
            let req = http::Request::post(path)
                .header("grpc-timeout", "200m")
                .header("content-type", "application/grpc")
                .body(axum::body::Body::empty())
                .unwrap();
            let started = std::time::Instant::now();
            let resp = router.call(req).await.unwrap();
            let h = resp.headers();
            let got = h.get("grpc-status").map(|v| v.to_str().unwrap());
            match status {
                Some((code, msg)) => {
                    assert!(started.elapsed() < std::time::Duration::from_millis(500));
                    assert_eq!(got, Some(code));
                    assert_eq!(
                        h.get("grpc-message").unwrap(),
                        msg.replace(' ', "%20").as_str()
                    );
                }
                None => assert_eq!(got, Some("0")),
            }
        }
    }
}
