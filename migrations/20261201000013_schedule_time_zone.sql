-- The zone a schedule's cadence is read in (an IANA name, checked by the
-- API): "Mondays at 09:00" is 09:00 where the customer lives, summer and
-- winter. Existing schedules were written in UTC and stay so.
ALTER TABLE replenishment_schedules ADD COLUMN time_zone text NOT NULL DEFAULT 'UTC';
