-- roles.sql: the role the xdcr agent connects as, with the least
-- privileges it needs. Run it as a superuser on EVERY site's database
-- (every site may become the primary after `xdcr promote`), after editing
-- the table list in step 1 to match tables: in xdcr.yaml:
--
--   psql -v ON_ERROR_STOP=1 -d shop -f roles.sql
--   psql -d shop -c '\password xdcr'       -- SCRAM, so the password never travels in clear
--
-- It is idempotent: run it again after adding tables. On a replica whose
-- tables do not exist yet, it grants what `xdcr sync` needs to create them
-- (they are then owned by xdcr); run it again after the sync.
--
-- What the agent does with each privilege:
--   REPLICATION            capture streams pgoutput from the slot xdcr_<cluster>,
--                          which it creates (pg_create_logical_replication_slot),
--                          and xdcr sync takes a temporary slot for its snapshot.
--   owning the tables      CREATE/ALTER PUBLICATION xdcr_<cluster> FOR TABLE needs
--                          the owner; so do the fence (a trigger that refuses
--                          application writes on every site that is not the
--                          primary: ALTER TABLE ... ENABLE/DISABLE TRIGGER), apply's
--                          ALTER TABLE ... ADD COLUMN with schema.auto_add_columns,
--                          and advancing the tables' sequences (setval) when a
--                          site is promoted. The owner also reads and writes the
--                          rows (apply, sync, verify, cache rebuild).
--   CREATE on the database CREATE PUBLICATION needs it, and so does the schema
--                          xdcr (applied position, capture state, cache outbox,
--                          the fence's function): the agent runs CREATE SCHEMA
--                          IF NOT EXISTS xdcr at every start.
--   USAGE, CREATE on the tables' schemas
--                          reaching the tables; xdcr sync creates missing ones.
--   SET session_replication_role
--                          apply and sync write as a replica session, so that
--                          the tables' ordinary triggers (and the fence) do not
--                          fire for replicated changes (PostgreSQL 15 or later;
--                          before 15 only a superuser can, so the role would
--                          have to be one).
--   pg_signal_backend      when a switchover fences the old primary, the fence
--                          waits for writers holding locks on the tables and then
--                          ends those sessions (pg_terminate_backend); superuser
--                          sessions cannot be ended this way.
--
-- What it does NOT get: SUPERUSER, CREATEDB, CREATEROLE, BYPASSRLS, or any
-- right on tables it does not replicate. Applications must use other roles
-- that own nothing and are not superusers: a table's owner can switch the
-- fence off (docs/failover.md). Because xdcr owns the replicated tables,
-- grant your application roles their rights explicitly (step 6).

\set ON_ERROR_STOP on

-- 1. The replicated tables, comma-separated, as under tables: in xdcr.yaml
--    (schema.table; quote mixed-case names: '"Billing"."Invoices"').
SELECT set_config('xdcr.tables', 'public.accounts,public.orders', false);

-- 2. The role: it may log in and stream, nothing else.
DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'xdcr') THEN
    CREATE ROLE xdcr;
  END IF;
END
$$;
ALTER ROLE xdcr WITH LOGIN REPLICATION INHERIT NOSUPERUSER NOCREATEDB NOCREATEROLE NOBYPASSRLS;

-- 3. The database: connect, create the publication and the schema xdcr.
DO $$
BEGIN
  EXECUTE format('GRANT CONNECT, CREATE ON DATABASE %I TO xdcr', current_database());
END
$$;

-- 4. session_replication_role and ending blockers of the fence.
DO $$
BEGIN
  IF current_setting('server_version_num')::int >= 150000 THEN
    EXECUTE 'GRANT SET ON PARAMETER session_replication_role TO xdcr';
  ELSE
    RAISE WARNING 'PostgreSQL % cannot grant SET ON PARAMETER (15 or later can): apply needs xdcr to be a superuser here (ALTER ROLE xdcr SUPERUSER)', current_setting('server_version');
  END IF;
END
$$;
GRANT pg_signal_backend TO xdcr;

-- 5. The tables: xdcr owns each (their sequences follow), and may use and
--    create in their schemas.
DO $$
DECLARE
  name text;
  parts text[];
  rel regclass;
BEGIN
  FOREACH name IN ARRAY string_to_array(current_setting('xdcr.tables'), ',') LOOP
    name := btrim(name);
    parts := parse_ident(name);
    IF array_length(parts, 1) = 1 THEN
      parts := ARRAY['public'] || parts;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = parts[1]) THEN
      RAISE WARNING 'schema % does not exist: create it (CREATE SCHEMA %) and run this again', quote_ident(parts[1]), quote_ident(parts[1]);
      CONTINUE;
    END IF;
    EXECUTE format('GRANT USAGE, CREATE ON SCHEMA %I TO xdcr', parts[1]);
    rel := to_regclass(format('%I.%I', parts[1], parts[2]));
    IF rel IS NULL THEN
      RAISE NOTICE 'table %.% does not exist here yet: xdcr sync will create it, owned by xdcr', quote_ident(parts[1]), quote_ident(parts[2]);
      CONTINUE;
    END IF;
    EXECUTE format('ALTER TABLE %s OWNER TO xdcr', rel);
  END LOOP;
END
$$;

-- 6. Your application roles keep the rights they had on the tables. For
--    tables that xdcr sync creates on a replica, give them their rights by
--    default (replace shop_app with your role):
-- ALTER DEFAULT PRIVILEGES FOR ROLE xdcr IN SCHEMA public
--   GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON TABLES TO shop_app;
-- ALTER DEFAULT PRIVILEGES FOR ROLE xdcr IN SCHEMA public
--   GRANT USAGE, SELECT ON SEQUENCES TO shop_app;

-- 7. Check: capture refuses a replicated table without a primary key (or
--    REPLICA IDENTITY FULL, or USING INDEX). This lists the ones here.
SELECT c.oid::regclass AS "needs a primary key or REPLICA IDENTITY FULL"
FROM unnest(string_to_array(current_setting('xdcr.tables'), ',')) AS t(name)
JOIN pg_class c ON c.oid = to_regclass(btrim(t.name))
WHERE CASE c.relreplident
        WHEN 'f' THEN false
        WHEN 'd' THEN NOT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)
        WHEN 'i' THEN NOT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisreplident)
        ELSE true
      END;
