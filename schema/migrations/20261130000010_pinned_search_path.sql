-- Functions no other role can redirect: a role that may create functions or
-- operators in a schema on the caller's search_path (`public` before
-- PostgreSQL 15) could otherwise plant a better-matching overload and run
-- code as whoever appends.
--
-- partition_of stays an inlinable SQL function (appends inline it, under the
-- caller's search_path): every function and operator in it is named with its
-- schema, and its arguments have pg_catalog's exact types.
CREATE OR REPLACE FUNCTION converge.partition_of(aggregate_type text, aggregate_id text)
RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT pg_catalog.int4(
        (pg_catalog.hashtextextended(
             aggregate_type OPERATOR(pg_catalog.||) '/'::text OPERATOR(pg_catalog.||) aggregate_id,
             0::bigint)
         OPERATOR(pg_catalog.&) 2147483647::bigint)
        OPERATOR(pg_catalog.%) 32::bigint)
$$;
-- The PL/pgSQL functions run with a fixed search_path.
ALTER FUNCTION converge.append(text, text, text, json, jsonb, bigint, uuid, timestamptz)
    SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION converge.check_cluster(bigint) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION converge.outbox_complete_row() SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION converge.define_tx_order(bigint, bigint) SET search_path = pg_catalog, pg_temp;

-- The audit log: an entry is settled once; after that nobody changes it, and
-- who recorded it (`details.recorded_by`) never changes. (Column privileges
-- already keep actor, action, target and time as written.)
CREATE FUNCTION converge.audit_settle_once() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF OLD.finished_at IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = '42501', MESSAGE = format(
            'converge.audit: entry %s is settled (%s) and cannot change', OLD.id, OLD.outcome);
    END IF;
    IF (NEW.details -> 'recorded_by') IS DISTINCT FROM (OLD.details -> 'recorded_by') THEN
        RAISE EXCEPTION USING ERRCODE = '42501', MESSAGE = format(
            'converge.audit: who recorded entry %s cannot change', OLD.id);
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER audit_settle_once BEFORE UPDATE ON converge.audit
    FOR EACH ROW EXECUTE FUNCTION converge.audit_settle_once();
