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
