-- A refresh token the reuse grace revoked in favour of a sibling (two tabs
-- refreshing with one token at once): presented later, it is a copy in
-- someone else's hands, and ends its family like any other reuse.
ALTER TABLE refresh_tokens ADD COLUMN superseded_at timestamptz;
