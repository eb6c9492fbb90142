-- Functions no other role can redirect: a role that may create functions in
-- a schema on the caller's search_path (`public` before PostgreSQL 15) could
-- otherwise plant a better-matching overload and run code as whoever appends.
--
-- partition_of stays an inlinable SQL function (appends inline it): its one
-- call is schema-qualified, with the argument types of pg_catalog's exactly.
CREATE OR REPLACE FUNCTION converge.partition_of(aggregate_type text, aggregate_id text)
RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT ((pg_catalog.hashtextextended(aggregate_type || '/' || aggregate_id, 0::bigint)
             & 2147483647) % 32)::integer
$$;
-- The PL/pgSQL functions run with a fixed search_path.
ALTER FUNCTION converge.append(text, text, text, json, jsonb, bigint, uuid, timestamptz)
    SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION converge.check_cluster(bigint) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION converge.outbox_complete_row() SET search_path = pg_catalog, pg_temp;
