"""Where sensors, inference and sync meet: the stages one reading or frame passes through on its
way into the journal. A sensor's `SourcePipeline` (`pipeline`), a camera's `CameraPipeline` and
the detectors cameras share (`vision`), anomaly scoring (`anomalies`) against fitted baselines on
disk (`baselines`), drift checks (`drift`), and the one writer of records and payloads
(`recorder`). Stages import only the floor (`appliance.runtime`), never the rooms above."""
