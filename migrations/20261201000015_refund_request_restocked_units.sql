-- The units an approved refund request actually put back on the shelf.
-- `restock` is the decider's choice; this is what it did. They differ when
-- an earlier approval of the same line restocked units whose refund Stripe
-- then refused: the customer may ask again for those units, but they are
-- already back in stock, so a later approval restocks only what is left of
-- the line (its quantity less what earlier approvals restocked, whatever
-- became of their refunds). Without it the same returned units went back
-- in stock twice and could be sold twice.
ALTER TABLE refund_requests
    ADD COLUMN restocked_units int NOT NULL DEFAULT 0;

-- Approvals so far restocked all their units.
UPDATE refund_requests SET restocked_units = quantity WHERE status = 'approved' AND restock;

ALTER TABLE refund_requests
    ADD CONSTRAINT refund_requests_restocked_units CHECK (
        restocked_units >= 0 AND restocked_units <= quantity
        AND (restocked_units = 0 OR (status = 'approved' AND restock)));
