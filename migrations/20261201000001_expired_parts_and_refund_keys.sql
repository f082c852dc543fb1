-- A seller order whose order expired unpaid: no longer pending for its
-- seller, yet still able to become paid if a late payment arrives while the
-- stock is there (or cancelled when that payment goes back).
ALTER TABLE seller_orders DROP CONSTRAINT seller_orders_status_check;
ALTER TABLE seller_orders ADD CONSTRAINT seller_orders_status_check
    CHECK (status IN ('pending', 'expired', 'paid', 'processing', 'shipped', 'delivered', 'cancelled', 'refunded'));
UPDATE seller_orders so SET status = 'expired', updated_at = now()
  FROM orders o WHERE o.id = so.order_id AND o.status = 'expired' AND so.status = 'pending';

-- An admin's refund retried with the same Idempotency-Key makes one refund.
ALTER TABLE refunds ADD COLUMN idempotency_key text, ADD COLUMN request_hash bytea;
CREATE UNIQUE INDEX refunds_idempotency ON refunds (seller_order_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- Placed orders are immutable: their lines (the snapshots of what was
-- bought) and their history are never changed or removed; later changes are
-- new order events. The ledger refuses TRUNCATE as well as row changes.
CREATE FUNCTION souk_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only (% refused)', TG_TABLE_NAME, TG_OP;
END $$;
CREATE TRIGGER order_lines_immutable BEFORE UPDATE OR DELETE ON order_lines
    FOR EACH ROW EXECUTE FUNCTION souk_immutable();
CREATE TRIGGER order_events_append_only BEFORE UPDATE OR DELETE ON order_events
    FOR EACH ROW EXECUTE FUNCTION souk_immutable();
CREATE TRIGGER order_lines_no_truncate BEFORE TRUNCATE ON order_lines
    FOR EACH STATEMENT EXECUTE FUNCTION souk_immutable();
CREATE TRIGGER ledger_entries_no_truncate BEFORE TRUNCATE ON ledger_entries
    FOR EACH STATEMENT EXECUTE FUNCTION souk_immutable();
CREATE TRIGGER ledger_transactions_no_truncate BEFORE TRUNCATE ON ledger_transactions
    FOR EACH STATEMENT EXECUTE FUNCTION souk_immutable();
