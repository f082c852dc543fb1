-- Access tokens are stateless JWTs: revoking refresh tokens alone leaves
-- every access token already handed out working until it expires. A password
-- change or reset, signing out everywhere, or an SSO sign-in taking over an
-- unverified account sets this to the (whole-second) time of the change, and
-- the API refuses access tokens issued before it. NULL: no such change yet.
ALTER TABLE users ADD COLUMN sessions_valid_after timestamptz;
