-- Access tokens are stateless JWTs: revoking refresh tokens alone leaves
-- every access token already handed out working until it expires. Each
-- token carries the account's session epoch as it was when issued; a
-- password change or reset, signing out everywhere, or an SSO sign-in
-- taking over an unverified account moves the epoch on, and the API refuses
-- tokens of an earlier one. (A count, not a time: a token issued in the
-- same second as the change, just before it, is refused as well.)
ALTER TABLE users ADD COLUMN session_epoch integer NOT NULL DEFAULT 0;
