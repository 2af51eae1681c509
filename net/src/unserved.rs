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

/// Routes every call the router does not serve to `answer`, answers unknown methods of served
/// services the same way, and, while `learner()` holds, every call a learner does not serve
/// (streams included) with etcd's "rpc not supported for learner". One layer checks both.
pub fn route(router: &mut axum::Router, learner: std::sync::Arc<dyn Fn() -> bool + Send + Sync>) {
    let r = std::mem::take(router);
    *router = r.fallback(answer).layer(axum::middleware::from_fn(
        move |req: axum::extract::Request, next: axum::middleware::Next| {
            let path = req.uri().path();
            let refused = if learner() && !LEARNER_SERVES.contains(&path) {
                Some(tonic::Status::unavailable(
                    "etcdserver: rpc not supported for learner",
                ))
            } else if unknown_method_of_served(path) {
                Some(tonic::Status::unimplemented(message(path)))
            } else {
                None
            };
            async move {
                if let Some(status) = refused {
                    let answer: http::Response<axum::body::Body> = status.into_http();
                    return answer;
                }
                next.run(req).await
            }
        },
    ));
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
}
