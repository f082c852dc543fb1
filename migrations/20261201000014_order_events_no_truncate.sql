-- An order's event trail refuses TRUNCATE too, as its lines, the ledger and
-- the audit log do: a row trigger does not fire on TRUNCATE, so without this
-- the whole history could go in one statement.
CREATE TRIGGER order_events_no_truncate BEFORE TRUNCATE ON order_events
    FOR EACH STATEMENT EXECUTE FUNCTION souk_immutable();
