-- Least privilege: workers run without owning the schema (no DDL rights).
--
-- `converge.rebase()` rewrites `converge.tx_order()` after a restore; only the
-- function's owner may, so the relay (a worker, not the owner) calls it as a
-- SECURITY DEFINER function with a fixed search_path. Every name in it is
-- schema-qualified or in pg_catalog. Only roles granted EXECUTE may call it
-- (`converge grants --role worker`).
ALTER FUNCTION converge.rebase() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
REVOKE EXECUTE ON FUNCTION converge.rebase() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION converge.define_tx_order(bigint, bigint) FROM PUBLIC;
