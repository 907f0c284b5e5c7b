//! API authorization, shared by the REST and gRPC edges: `Authorization: Bearer <token>`,
//! compared in constant time. Writes need the admin token (none configured: writes are
//! disabled); reads that reveal the rules or the keys need the read token when one is configured
//! (or the admin token).

/// Why a write was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// No admin token is configured: writes are disabled (403 / PERMISSION_DENIED).
    Disabled,
    /// The header is missing or the token wrong (401 / UNAUTHENTICATED).
    Unauthorized,
}

impl Denied {
    /// What to tell the caller.
    pub fn message(self) -> &'static str {
        match self {
            Denied::Disabled => "no admin token is configured: API writes are disabled",
            Denied::Unauthorized => "a valid `Authorization: Bearer <admin token>` is required",
        }
    }
}

/// Checks an `Authorization` header value against the configured token.
pub fn check(token: Option<&str>, authorization: Option<&str>) -> Result<(), Denied> {
    let token = token.ok_or(Denied::Disabled)?;
    // The scheme is case-insensitive (RFC 9110, 11.1).
    let given = authorization
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map_or("", |(_, token)| token.trim());
    // Constant time in the token's content (the length is not secret).
    let equal = given.len() == token.len()
        && given
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if equal {
        Ok(())
    } else {
        Err(Denied::Unauthorized)
    }
}

/// Checks a read: open without a read token; else the read token or the admin token.
pub fn check_read(
    read: Option<&str>,
    admin: Option<&str>,
    authorization: Option<&str>,
) -> Result<(), Denied> {
    match read {
        None => Ok(()),
        Some(token) => check(Some(token), authorization)
            .or_else(|_| check(admin, authorization))
            .map_err(|_| Denied::Unauthorized),
    }
}

/// Checks a usage report: the usage token or the admin token; with neither configured,
/// reports are refused (a report lowers what a request is charged, so it is a write).
pub fn check_usage(
    usage: Option<&str>,
    admin: Option<&str>,
    authorization: Option<&str>,
) -> Result<(), Denied> {
    if usage.is_none() && admin.is_none() {
        return Err(Denied::Disabled);
    }
    check(usage, authorization)
        .or_else(|_| check(admin, authorization))
        .map_err(|_| Denied::Unauthorized)
}

/// What to tell a usage reporter without a token.
pub const USAGE_REFUSED: &str =
    "a valid `Authorization: Bearer <usage token>` (or the admin token) is required";

/// What to tell a usage reporter when no token is configured.
pub const USAGE_DISABLED: &str =
    "usage reports are disabled: configure `usageTokenFile` (or an admin token)";

/// What to tell a reader without the read token.
pub const READ_REFUSED: &str = "a valid `Authorization: Bearer <read token>` is required";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_reports_need_the_usage_or_admin_token() {
        let (u, a) = (Some("usage-token-0123"), Some("admin-token-0123"));
        assert_eq!(
            check_usage(None, None, Some("Bearer x")),
            Err(Denied::Disabled)
        );
        assert_eq!(check_usage(u, a, Some("Bearer usage-token-0123")), Ok(()));
        assert_eq!(check_usage(u, a, Some("Bearer admin-token-0123")), Ok(()));
        assert_eq!(
            check_usage(None, a, Some("Bearer admin-token-0123")),
            Ok(())
        );
        assert_eq!(
            check_usage(u, a, Some("Bearer read-token-01234")),
            Err(Denied::Unauthorized)
        );
        assert_eq!(check_usage(u, None, None), Err(Denied::Unauthorized));
    }

    #[test]
    fn bearer_tokens() {
        let t = Some("0123456789abcdef");
        assert_eq!(check(t, Some("Bearer 0123456789abcdef")), Ok(()));
        assert_eq!(
            check(t, Some("Bearer 0123456789abcdeX")),
            Err(Denied::Unauthorized)
        );
        assert_eq!(
            check(t, Some("0123456789abcdef")),
            Err(Denied::Unauthorized)
        );
        assert_eq!(check(t, None), Err(Denied::Unauthorized));
        assert_eq!(check(None, Some("Bearer x")), Err(Denied::Disabled));
    }

    #[test]
    fn reads() {
        let (r, a) = (Some("read-0123456789abc"), Some("admin-0123456789ab"));
        assert_eq!(check_read(None, a, None), Ok(()));
        assert_eq!(check_read(r, a, Some("Bearer read-0123456789abc")), Ok(()));
        assert_eq!(check_read(r, a, Some("Bearer admin-0123456789ab")), Ok(()));
        assert_eq!(
            check_read(r, None, Some("Bearer admin-0123456789ab")),
            Err(Denied::Unauthorized)
        );
        assert_eq!(check_read(r, a, None), Err(Denied::Unauthorized));
    }
}
