-- A withdrawal keeps the account it was requested to. Until now only the
-- holder and the last four were kept, and the admin paying it read the
-- shop's payout details as they were at payment time: a change of IBAN
-- between request and payment sent the money to an account the request and
-- the mails did not name. The account number is sealed the same way as in
-- payout_details (AES-256-GCM, PAYOUT_DETAILS_KEY, bound to the shop's id),
-- so the ciphertext and nonce are copied as they are.
ALTER TABLE withdrawals
    ADD COLUMN iban_ciphertext bytea,
    ADD COLUMN iban_nonce      bytea;

-- Open withdrawals take the shop's current payout details: that is the
-- account they would have been paid to anyway, and nothing open is left
-- without one. (A request always needed payout details, and they are never
-- deleted, so every open withdrawal's shop has them.)
UPDATE withdrawals w
   SET iban_ciphertext = p.iban_ciphertext, iban_nonce = p.iban_nonce
  FROM payout_details p
 WHERE p.shop_id = w.shop_id AND w.status = 'requested';

-- Decided withdrawals stay without one: the account they were paid to was
-- never recorded, and today's details may not be it. So the columns cannot
-- be NOT NULL; instead every open withdrawal must carry an account, and as
-- every withdrawal is inserted open, every one requested from now on does.
ALTER TABLE withdrawals
    ADD CONSTRAINT withdrawals_account_whole
        CHECK ((iban_ciphertext IS NULL) = (iban_nonce IS NULL)),
    ADD CONSTRAINT withdrawals_open_has_account
        CHECK (status <> 'requested' OR iban_ciphertext IS NOT NULL);
