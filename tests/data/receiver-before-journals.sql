-- receiver.db written by the receiver before journal identities (migrations 0001-0002):
-- ship-1 and ship-2 batches, one duplicate resend, one payload of ship-1. Made with tests' record shape.
PRAGMA foreign_keys=OFF;
BEGIN TRANSACTION;
CREATE TABLE migrations (name TEXT PRIMARY KEY, applied_ts TEXT NOT NULL);
INSERT INTO migrations VALUES('0001_initial','2026-12-07T10:39:25.717048Z');
INSERT INTO migrations VALUES('0002_model_packages','2026-12-07T10:39:25.717498Z');
CREATE TABLE records (
            appliance_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            priority TEXT NOT NULL,
            kind TEXT NOT NULL,
            ts TEXT NOT NULL,
            batch_id TEXT NOT NULL,
            received_ts TEXT NOT NULL,
            line TEXT NOT NULL,
            PRIMARY KEY (appliance_id, seq)
        ) WITHOUT ROWID;
INSERT INTO records VALUES('ship-1',1,'alert','detection','2026-11-02T00:00:01.000000Z','alert-1-2','2026-12-07T10:39:25.720771Z','{"seq": 1, "appliance_id": "ship-1", "boot_id": "b0", "ts": "2026-11-02T00:00:01.000000Z", "mono_ns": 1000, "source": "deck", "kind": "detection", "priority": "alert", "model": "yolo@1", "body": {"n": 1}, "payloads": ["aff46489b668d7d10d9cd3aeb3a2cfb45491a197ded1cb34696acdbb1eec3e35"]}');
INSERT INTO records VALUES('ship-1',2,'alert','detection','2026-11-03T00:00:02.000000Z','alert-1-2','2026-12-07T10:39:25.720771Z','{"seq": 2, "appliance_id": "ship-1", "boot_id": "b0", "ts": "2026-11-03T00:00:02.000000Z", "mono_ns": 2000, "source": "deck", "kind": "detection", "priority": "alert", "model": "yolo@1", "body": {"n": 2}, "payloads": []}');
INSERT INTO records VALUES('ship-1',3,'event','detection','2026-11-04T00:00:03.000000Z','event-3-5','2026-12-07T10:39:25.722174Z','{"seq": 3, "appliance_id": "ship-1", "boot_id": "b0", "ts": "2026-11-04T00:00:03.000000Z", "mono_ns": 3000, "source": "deck", "kind": "detection", "priority": "event", "model": "yolo@1", "body": {"n": 3}, "payloads": []}');
INSERT INTO records VALUES('ship-1',4,'event','detection','2026-11-05T00:00:04.000000Z','event-3-5','2026-12-07T10:39:25.722174Z','{"seq": 4, "appliance_id": "ship-1", "boot_id": "b0", "ts": "2026-11-05T00:00:04.000000Z", "mono_ns": 4000, "source": "deck", "kind": "detection", "priority": "event", "model": "yolo@1", "body": {"n": 4}, "payloads": []}');
INSERT INTO records VALUES('ship-1',5,'event','detection','2026-11-01T00:00:05.000000Z','event-3-5','2026-12-07T10:39:25.722174Z','{"seq": 5, "appliance_id": "ship-1", "boot_id": "b0", "ts": "2026-11-01T00:00:05.000000Z", "mono_ns": 5000, "source": "deck", "kind": "detection", "priority": "event", "model": "yolo@1", "body": {"n": 5}, "payloads": []}');
INSERT INTO records VALUES('ship-1',6,'telemetry','detection','2026-11-02T00:00:06.000000Z','telemetry-6-9','2026-12-07T10:39:25.723304Z','{"seq": 6, "appliance_id": "ship-1", "boot_id": "b0", "ts": "2026-11-02T00:00:06.000000Z", "mono_ns": 6000, "source": "deck", "kind": "detection", "priority": "telemetry", "model": "yolo@1", "body": {"n": 6}, "payloads": []}');
INSERT INTO records VALUES('ship-1',7,'telemetry','detection','2026-11-03T00:00:07.000000Z','telemetry-6-9','2026-12-07T10:39:25.723304Z','{"seq": 7, "appliance_id": "ship-1", "boot_id": "b0", "ts": "2026-11-03T00:00:07.000000Z", "mono_ns": 7000, "source": "deck", "kind": "detection", "priority": "telemetry", "model": "yolo@1", "body": {"n": 7}, "payloads": []}');
INSERT INTO records VALUES('ship-1',8,'telemetry','detection','2026-11-04T00:00:08.000000Z','telemetry-6-9','2026-12-07T10:39:25.723304Z','{"seq": 8, "appliance_id": "ship-1", "boot_id": "b0", "ts": "2026-11-04T00:00:08.000000Z", "mono_ns": 8000, "source": "deck", "kind": "detection", "priority": "telemetry", "model": "yolo@1", "body": {"n": 8}, "payloads": []}');
INSERT INTO records VALUES('ship-1',9,'telemetry','detection','2026-11-05T00:00:09.000000Z','telemetry-6-9','2026-12-07T10:39:25.723304Z','{"seq": 9, "appliance_id": "ship-1", "boot_id": "b0", "ts": "2026-11-05T00:00:09.000000Z", "mono_ns": 9000, "source": "deck", "kind": "detection", "priority": "telemetry", "model": "yolo@1", "body": {"n": 9}, "payloads": []}');
INSERT INTO records VALUES('ship-2',1,'event','detection','2026-11-02T00:00:01.000000Z','event-1-3','2026-12-07T10:39:25.724334Z','{"seq": 1, "appliance_id": "ship-2", "boot_id": "b0", "ts": "2026-11-02T00:00:01.000000Z", "mono_ns": 1000, "source": "deck", "kind": "detection", "priority": "event", "model": "yolo@1", "body": {"n": 1}, "payloads": []}');
INSERT INTO records VALUES('ship-2',2,'event','detection','2026-11-03T00:00:02.000000Z','event-1-3','2026-12-07T10:39:25.724334Z','{"seq": 2, "appliance_id": "ship-2", "boot_id": "b0", "ts": "2026-11-03T00:00:02.000000Z", "mono_ns": 2000, "source": "deck", "kind": "detection", "priority": "event", "model": "yolo@1", "body": {"n": 2}, "payloads": []}');
INSERT INTO records VALUES('ship-2',3,'event','detection','2026-11-04T00:00:03.000000Z','event-1-3','2026-12-07T10:39:25.724334Z','{"seq": 3, "appliance_id": "ship-2", "boot_id": "b0", "ts": "2026-11-04T00:00:03.000000Z", "mono_ns": 3000, "source": "deck", "kind": "detection", "priority": "event", "model": "yolo@1", "body": {"n": 3}, "payloads": []}');
CREATE TABLE batches (
            appliance_id TEXT NOT NULL,
            batch_id TEXT NOT NULL,
            priority TEXT NOT NULL,
            first_seq INTEGER NOT NULL,
            last_seq INTEGER NOT NULL,
            times_received INTEGER NOT NULL,
            stored INTEGER NOT NULL,
            duplicates INTEGER NOT NULL,
            first_received_ts TEXT NOT NULL,
            last_received_ts TEXT NOT NULL,
            PRIMARY KEY (appliance_id, batch_id)
        ) WITHOUT ROWID;
INSERT INTO batches VALUES('ship-1','alert-1-2','alert',1,2,1,2,0,'2026-12-07T10:39:25.720771Z','2026-12-07T10:39:25.720771Z');
INSERT INTO batches VALUES('ship-1','event-3-5','event',3,5,2,3,3,'2026-12-07T10:39:25.722174Z','2026-12-07T10:39:25.725370Z');
INSERT INTO batches VALUES('ship-1','telemetry-6-9','telemetry',6,9,1,4,0,'2026-12-07T10:39:25.723304Z','2026-12-07T10:39:25.723304Z');
INSERT INTO batches VALUES('ship-2','event-1-3','event',1,3,1,3,0,'2026-12-07T10:39:25.724334Z','2026-12-07T10:39:25.724334Z');
CREATE TABLE payloads (
            appliance_id TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            size INTEGER NOT NULL,
            completed_ts TEXT NOT NULL,
            PRIMARY KEY (appliance_id, sha256)
        ) WITHOUT ROWID;
INSERT INTO payloads VALUES('ship-1','aff46489b668d7d10d9cd3aeb3a2cfb45491a197ded1cb34696acdbb1eec3e35',330,'2026-12-07T10:39:25.728410Z');
CREATE TABLE appliances (
            appliance_id TEXT PRIMARY KEY,
            records INTEGER NOT NULL DEFAULT 0,
            duplicates_ignored INTEGER NOT NULL DEFAULT 0,
            batches INTEGER NOT NULL DEFAULT 0,
            payloads INTEGER NOT NULL DEFAULT 0,
            payload_bytes INTEGER NOT NULL DEFAULT 0,
            first_seen_ts TEXT NOT NULL,
            last_seen_ts TEXT NOT NULL
        );
INSERT INTO appliances VALUES('ship-1',9,3,3,1,330,'2026-12-07T10:39:25.720771Z','2026-12-07T10:39:25.728410Z');
INSERT INTO appliances VALUES('ship-2',3,0,1,0,0,'2026-12-07T10:39:25.724334Z','2026-12-07T10:39:25.724334Z');
CREATE TABLE model_packages (
            name TEXT NOT NULL,
            version TEXT NOT NULL,
            sha256 TEXT NOT NULL UNIQUE,
            size INTEGER NOT NULL,
            appliances TEXT NOT NULL,
            groups TEXT NOT NULL,
            published_ts TEXT NOT NULL,
            PRIMARY KEY (name, version)
        ) WITHOUT ROWID;
COMMIT;
