-- Removing a saved card looks for an unpaid order still to be charged to
-- it (a replenishment placed before its schedule moved to another card);
-- only orders paid with a saved card have one, so the index is small.
CREATE INDEX orders_payment_method ON orders (payment_method_id)
    WHERE payment_method_id IS NOT NULL;
