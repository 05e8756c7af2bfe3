//! The PostgreSQL schema of the CRS and its migrations.
//!
//! The schema is versioned by one row in `ims_schema`. Each entry of
//! [`MIGRATIONS`] takes the schema from version `i` to `i + 1` and runs in
//! its own transaction together with the version bump, so a crash between
//! two steps leaves a valid (older) version behind. `ims-crs` migrates at
//! start; several instances starting at once take turns on an advisory lock.
//! A database whose version is newer than this program knows is refused:
//! an older binary must not write into a layout it does not understand.

/// Advisory lock key held while migrating ("ims-schema" as a number).
pub const MIGRATION_LOCK: i64 = 0x696d_735f_7363_6800;

/// Each step, oldest first; version `n` is reached after `MIGRATIONS[n-1]`.
pub const MIGRATIONS: &[&str] = &[
    // 1: durable data. Names are compared byte-wise (COLLATE "C") so the
    // order of listings is the same as sled's whatever the database locale.
    r#"
    CREATE TABLE users (
        name          text COLLATE "C" PRIMARY KEY,
        salt          bytea  NOT NULL,
        iterations    bigint NOT NULL,
        stored_key    bytea  NOT NULL,
        server_key    bytea  NOT NULL,
        profile       text   NOT NULL,
        public_key    bytea  NOT NULL,
        wrapped_key   bytea  NOT NULL,
        created_unix  bigint NOT NULL
    );
    -- One row per direction: (a, b) and (b, a) for buddies a and b.
    CREATE TABLE contacts (
        owner  text COLLATE "C" NOT NULL REFERENCES users(name) ON DELETE CASCADE,
        buddy  text COLLATE "C" NOT NULL REFERENCES users(name) ON DELETE CASCADE,
        PRIMARY KEY (owner, buddy)
    );
    CREATE INDEX contacts_buddy ON contacts (buddy);
    -- At most one request per sender; `seq` orders them oldest first.
    CREATE TABLE requests (
        recipient     text COLLATE "C" NOT NULL REFERENCES users(name) ON DELETE CASCADE,
        sender        text COLLATE "C" NOT NULL REFERENCES users(name) ON DELETE CASCADE,
        seq           bigserial NOT NULL,
        signature     bytea  NOT NULL,
        nonce         bytea  NOT NULL,
        created_unix  bigint NOT NULL,
        PRIMARY KEY (recipient, sender)
    );
    CREATE INDEX requests_sender ON requests (sender);
    "#,
    // 2: the CRS's own key pair, wrapped under the MSkey, so every instance
    // speaks as the same directory; and the live state every instance shares.
    r#"
    CREATE TABLE crs_identity (
        id       int PRIMARY KEY CHECK (id = 1),
        wrapped  bytea NOT NULL,
        instance text NOT NULL
    );
    CREATE TABLE live_ms (
        id         bigserial PRIMARY KEY,
        address    text NOT NULL UNIQUE,
        capacity   bigint NOT NULL,
        instance   text NOT NULL,
        last_seen  timestamptz NOT NULL DEFAULT clock_timestamp(),
        next_seq   bigint NOT NULL DEFAULT 1
    );
    CREATE TABLE live_online (
        name        text COLLATE "C" PRIMARY KEY,
        ms          bigint NOT NULL REFERENCES live_ms(id) ON DELETE CASCADE,
        address     text NOT NULL,
        public_key  bytea NOT NULL,
        login       bigint NOT NULL
    );
    CREATE INDEX live_online_ms ON live_online (ms);
    CREATE SEQUENCE live_login_seq;
    CREATE TABLE live_locks (
        name     text COLLATE "C" PRIMARY KEY,
        ms       bigint NOT NULL REFERENCES live_ms(id) ON DELETE CASCADE,
        expires  timestamptz NOT NULL
    );
    CREATE INDEX live_locks_ms ON live_locks (ms);
    CREATE TABLE live_events (
        ms          bigint NOT NULL REFERENCES live_ms(id) ON DELETE CASCADE,
        seq         bigint NOT NULL,
        recipients  text NOT NULL,
        kind        text NOT NULL,
        PRIMARY KEY (ms, seq)
    );
    "#,
    // 3: password attempts per (name, source), counted for the whole
    // directory rather than per instance.
    r#"
    CREATE TABLE live_guesses (
        name    text COLLATE "C" NOT NULL,
        source  text NOT NULL,
        count   bigint NOT NULL DEFAULT 0,
        last    timestamptz NOT NULL DEFAULT clock_timestamp(),
        PRIMARY KEY (name, source)
    );
    CREATE INDEX live_guesses_last ON live_guesses (last);
    "#,
    // 4: whom each user blocks. The blocked name need not be registered
    // (a block outlives the blocked account), so it references nothing.
    r#"
    CREATE TABLE blocks (
        owner    text COLLATE "C" NOT NULL REFERENCES users(name) ON DELETE CASCADE,
        blocked  text COLLATE "C" NOT NULL,
        PRIMARY KEY (owner, blocked)
    );
    "#,
    // 5: each user's status and personal message, kept across logins.
    r#"
    ALTER TABLE users
        ADD COLUMN status         text NOT NULL DEFAULT 'available',
        ADD COLUMN status_message text NOT NULL DEFAULT '';
    "#,
];

/// The version this program writes.
pub const CURRENT: i32 = MIGRATIONS.len() as i32;
