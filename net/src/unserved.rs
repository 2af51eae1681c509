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
    } else if NOT_YET.iter().any(|(s, _)| *s == service) {
        format!("unknown method {method} for service {service}")
    } else {
        format!("unknown service {service}")
    }
}

async fn answer(uri: http::Uri) -> http::Response<tonic::body::Body> {
    tonic::Status::unimplemented(message(uri.path())).into_http()
}

/// Routes every call the router does not serve to `answer`.
pub fn route(router: &mut axum::Router) {
    let r = std::mem::take(router);
    *router = r.fallback(answer);
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
        assert_eq!(message("/nothing"), "malformed method name: \"/nothing\"");
    }
}
