-- The device registry. The gateway owns it: devices authenticate against it; the API provisions
-- through the gateway, never by writing here.
CREATE TABLE devices (
    device_id     text        PRIMARY KEY,
    building_id   text        NOT NULL,
    kind          text        NOT NULL CHECK (kind IN ('elevator', 'screen')),
    -- SHA-256 of the device's high-entropy secret; the secret itself is never stored.
    secret_sha256 bytea       NOT NULL CHECK (length(secret_sha256) = 32),
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    revoked_at    timestamptz
);

CREATE INDEX devices_updated_at ON devices (updated_at);
