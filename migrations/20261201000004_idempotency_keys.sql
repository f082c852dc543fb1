-- Idempotency-Key on every POST that moves money or sets up charges: the
-- row the first request made keeps the key and a digest of the request, so
-- a retry answers that row and the key with another request is refused.
-- The unique indexes make two racing retries unable to both make a row.
ALTER TABLE withdrawals ADD COLUMN request_hash bytea;

ALTER TABLE memberships ADD COLUMN idempotency_key text, ADD COLUMN request_hash bytea;
CREATE UNIQUE INDEX memberships_idempotency ON memberships (user_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

ALTER TABLE replenishment_schedules ADD COLUMN idempotency_key text, ADD COLUMN request_hash bytea;
CREATE UNIQUE INDEX replenishment_schedules_idempotency ON replenishment_schedules (customer_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
