/**
 * The catalog: a SQLite database (WAL, synchronous=FULL) holding volumes, snapshots, layers and their
 * bitmaps. Every structural change is one transaction, so a crash leaves either the old or the new
 * shape, never a mix. Head bitmaps are persisted incrementally as journal rows appended on each flush
 * and folded into the layer row when the journal grows or the layer is frozen.
 */
import Database from 'better-sqlite3';
import type { Bitmap } from './bitmap.js';
import { decodeBitmap, encodeBitmap } from './bitmap.js';
import { translateIoError } from './errors.js';

/** 2 added tombstones; a version-1 catalog is upgraded in place (the table is new, nothing else changed). */
const SCHEMA_VERSION = 2;
// 2 also added snapshot groups (snapshot_groups, snapshot_group_members).

/** Journal rows a layer may accumulate before they are folded into its full bitmaps. */
export const JOURNAL_FOLD_THRESHOLD = 64;

export interface LayerRow {
  id: number;
  parent_id: number | null;
  block_size: number;
  frozen: number;
  written: Buffer | null;
  trimmed: Buffer | null;
}

export interface JournalRow {
  layer_id: number;
  seq: number;
  set_written: Buffer | null;
  set_trimmed: Buffer | null;
}

export interface VolumeRow {
  id: string;
  name: string | null;
  capacity_bytes: number;
  block_size: number;
  head_layer_id: number;
  source_kind: string | null;
  source_id: string | null;
  attributes: string;
  created_at_ms: number;
}

export interface GroupRow {
  id: string;
  name: string | null;
  created_at_ms: number;
  /** Member snapshots in request order. */
  snapshot_ids: string[];
}

export interface TombstoneRow {
  snapshot_id: string;
  source_volume_id: string;
  anchor_layer_id: number;
  changed: Buffer | null;
  expired: number;
  /** 1 when the anchor's own bits count (except `excluded`). */
  counts_anchor: number;
  excluded: Buffer | null;
  capacity_bytes: number;
  block_size: number;
  deleted_at_ms: number;
}

export interface SnapshotRow {
  id: string;
  name: string | null;
  source_volume_id: string;
  layer_id: number;
  capacity_bytes: number;
  block_size: number;
  attributes: string;
  created_at_ms: number;
}

/** A layer's bitmaps as the catalog has them (full row plus journal applied). */
export interface StoredBitmaps {
  written: Bitmap;
  trimmed: Bitmap;
}

/** A layer as the catalog has it, bitmaps included. */
export interface StoredLayer extends StoredBitmaps {
  id: number;
  parentId: number | null;
  blockSize: number;
  frozen: boolean;
}

/** Applies one journal entry: blocks set to written leave trimmed and vice versa. */
function applyJournal(target: StoredBitmaps, setWritten: Bitmap, setTrimmed: Bitmap): void {
  target.trimmed.andNotInPlace(setWritten);
  target.written.orInPlace(setWritten);
  target.written.andNotInPlace(setTrimmed);
  target.trimmed.orInPlace(setTrimmed);
}

export class Catalog {
  readonly db: Database.Database;
  private readonly stmt;

  constructor(path: string) {
    this.db = new Database(path);
    this.db.pragma('journal_mode = WAL');
    // FULL: a commit is on disk when it returns, so a flushed write survives power loss, not just kill -9.
    this.db.pragma('synchronous = FULL');
    this.migrate();
    const db = this.db;
    this.stmt = {
      layerSequence: db.prepare("SELECT seq FROM sqlite_sequence WHERE name = 'layers'"),
      insertLayer: db.prepare('INSERT INTO layers (parent_id, block_size, frozen, created_at_ms) VALUES (?, ?, 0, ?)'),
      deleteLayer: db.prepare('DELETE FROM layers WHERE id = ?'),
      deleteJournal: db.prepare('DELETE FROM layer_journal WHERE layer_id = ?'),
      setLayerParent: db.prepare('UPDATE layers SET parent_id = ? WHERE id = ?'),
      freezeLayer: db.prepare('UPDATE layers SET frozen = 1, written = ?, trimmed = ? WHERE id = ?'),
      setLayerBitmaps: db.prepare('UPDATE layers SET written = ?, trimmed = ? WHERE id = ?'),
      appendJournal: db.prepare(
        `INSERT INTO layer_journal (layer_id, seq, set_written, set_trimmed)
         VALUES (?, COALESCE((SELECT MAX(seq) FROM layer_journal WHERE layer_id = ?), 0) + 1, ?, ?)`,
      ),
      journalCount: db.prepare('SELECT COUNT(*) AS n FROM layer_journal WHERE layer_id = ?'),
      layerRow: db.prepare('SELECT * FROM layers WHERE id = ?'),
      journalRows: db.prepare('SELECT * FROM layer_journal WHERE layer_id = ? ORDER BY seq'),
      allLayers: db.prepare('SELECT * FROM layers ORDER BY id'),
      allJournalRows: db.prepare('SELECT * FROM layer_journal ORDER BY layer_id, seq'),
      insertVolume: db.prepare(
        `INSERT INTO volumes (id, name, capacity_bytes, block_size, head_layer_id, source_kind, source_id, attributes, created_at_ms)
         VALUES (@id, @name, @capacity_bytes, @block_size, @head_layer_id, @source_kind, @source_id, @attributes, @created_at_ms)`,
      ),
      deleteVolume: db.prepare('DELETE FROM volumes WHERE id = ?'),
      setVolumeHead: db.prepare('UPDATE volumes SET head_layer_id = ? WHERE id = ?'),
      setVolumeCapacity: db.prepare('UPDATE volumes SET capacity_bytes = ? WHERE id = ?'),
      setVolumeAttributes: db.prepare('UPDATE volumes SET attributes = ? WHERE id = ?'),
      allVolumes: db.prepare('SELECT * FROM volumes ORDER BY rowid'),
      insertSnapshot: db.prepare(
        `INSERT INTO snapshots (id, name, source_volume_id, layer_id, capacity_bytes, block_size, attributes, created_at_ms)
         VALUES (@id, @name, @source_volume_id, @layer_id, @capacity_bytes, @block_size, @attributes, @created_at_ms)`,
      ),
      deleteSnapshot: db.prepare('DELETE FROM snapshots WHERE id = ?'),
      allSnapshots: db.prepare('SELECT * FROM snapshots ORDER BY rowid'),
      insertTombstone: db.prepare(
        `INSERT INTO tombstones (snapshot_id, source_volume_id, anchor_layer_id, changed, expired, counts_anchor, excluded, capacity_bytes, block_size, deleted_at_ms)
         VALUES (@snapshot_id, @source_volume_id, @anchor_layer_id, @changed, @expired, @counts_anchor, @excluded, @capacity_bytes, @block_size, @deleted_at_ms)`,
      ),
      moveTombstone: db.prepare(
        'UPDATE tombstones SET anchor_layer_id = ?, changed = ?, expired = ?, counts_anchor = ?, excluded = ? WHERE snapshot_id = ?',
      ),
      deleteTombstone: db.prepare('DELETE FROM tombstones WHERE snapshot_id = ?'),
      allTombstones: db.prepare('SELECT * FROM tombstones ORDER BY deleted_at_ms'),
      insertGroup: db.prepare('INSERT INTO snapshot_groups (id, name, created_at_ms) VALUES (?, ?, ?)'),
      insertGroupMember: db.prepare(
        'INSERT INTO snapshot_group_members (snapshot_id, group_id, position) VALUES (?, ?, ?)',
      ),
      deleteGroup: db.prepare('DELETE FROM snapshot_groups WHERE id = ?'),
      deleteGroupMembers: db.prepare('DELETE FROM snapshot_group_members WHERE group_id = ?'),
      allGroups: db.prepare('SELECT * FROM snapshot_groups ORDER BY rowid'),
      allGroupMembers: db.prepare('SELECT * FROM snapshot_group_members ORDER BY group_id, position'),
    };
  }

  private migrate(): void {
    this.db.exec(`
      CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
      CREATE TABLE IF NOT EXISTS layers (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        parent_id INTEGER,
        block_size INTEGER NOT NULL,
        frozen INTEGER NOT NULL DEFAULT 0,
        written BLOB,
        trimmed BLOB,
        created_at_ms INTEGER NOT NULL
      );
      CREATE TABLE IF NOT EXISTS layer_journal (
        layer_id INTEGER NOT NULL,
        seq INTEGER NOT NULL,
        set_written BLOB,
        set_trimmed BLOB,
        PRIMARY KEY (layer_id, seq)
      );
      CREATE TABLE IF NOT EXISTS volumes (
        id TEXT PRIMARY KEY,
        name TEXT UNIQUE,
        capacity_bytes INTEGER NOT NULL,
        block_size INTEGER NOT NULL,
        head_layer_id INTEGER NOT NULL,
        source_kind TEXT,
        source_id TEXT,
        attributes TEXT NOT NULL,
        created_at_ms INTEGER NOT NULL
      );
      CREATE TABLE IF NOT EXISTS snapshots (
        id TEXT PRIMARY KEY,
        name TEXT UNIQUE,
        source_volume_id TEXT NOT NULL,
        layer_id INTEGER NOT NULL,
        capacity_bytes INTEGER NOT NULL,
        block_size INTEGER NOT NULL,
        attributes TEXT NOT NULL,
        created_at_ms INTEGER NOT NULL
      );
      CREATE TABLE IF NOT EXISTS snapshot_groups (
        id TEXT PRIMARY KEY,
        name TEXT UNIQUE,
        created_at_ms INTEGER NOT NULL
      );
      CREATE TABLE IF NOT EXISTS snapshot_group_members (
        snapshot_id TEXT PRIMARY KEY,
        group_id TEXT NOT NULL,
        position INTEGER NOT NULL
      );
      CREATE TABLE IF NOT EXISTS tombstones (
        snapshot_id TEXT PRIMARY KEY,
        source_volume_id TEXT NOT NULL,
        anchor_layer_id INTEGER NOT NULL,
        changed BLOB,
        expired INTEGER NOT NULL DEFAULT 0,
        counts_anchor INTEGER NOT NULL DEFAULT 0,
        excluded BLOB,
        capacity_bytes INTEGER NOT NULL,
        block_size INTEGER NOT NULL,
        deleted_at_ms INTEGER NOT NULL
      );
    `);
    const row = this.db.prepare("SELECT value FROM meta WHERE key = 'schema_version'").get() as
      | { value: string }
      | undefined;
    if (!row) {
      this.db.prepare("INSERT INTO meta (key, value) VALUES ('schema_version', ?)").run(String(SCHEMA_VERSION));
    } else if (Number(row.value) === 1) {
      this.db.prepare("UPDATE meta SET value = ? WHERE key = 'schema_version'").run(String(SCHEMA_VERSION));
    } else if (Number(row.value) !== SCHEMA_VERSION) {
      throw new Error(`catalog schema version ${row.value} is not supported (expected ${SCHEMA_VERSION})`);
    }
  }

  /** Runs `fn` in one transaction (nested calls join the outer one); a full disk is NoSpaceError. */
  transaction<T>(fn: () => T): T {
    try {
      return this.db.transaction(fn)();
    } catch (err) {
      return translateIoError(err, 'committing to the catalog');
    }
  }

  /** The id the next inserted layer row gets (AUTOINCREMENT: never one that was used before). */
  nextLayerId(): number {
    const row = this.stmt.layerSequence.get() as { seq: number } | undefined;
    return (row?.seq ?? 0) + 1;
  }

  insertLayer(parentId: number | null, blockSize: number, nowMs: number): number {
    return Number(this.stmt.insertLayer.run(parentId, blockSize, nowMs).lastInsertRowid);
  }

  deleteLayer(id: number): void {
    this.transaction(() => {
      this.stmt.deleteJournal.run(id);
      this.stmt.deleteLayer.run(id);
    });
  }

  setLayerParent(id: number, parentId: number | null): void {
    this.stmt.setLayerParent.run(parentId, id);
  }

  /** Freezes a layer, storing its complete bitmaps and dropping its journal. */
  freezeLayer(id: number, written: Bitmap, trimmed: Bitmap): void {
    this.stmt.freezeLayer.run(encodeBitmap(written), encodeBitmap(trimmed), id);
    this.stmt.deleteJournal.run(id);
  }

  /** Appends one incremental bitmap change; folds the journal when it has grown long. */
  appendJournal(id: number, setWritten: Bitmap, setTrimmed: Bitmap): void {
    if (setWritten.isEmpty && setTrimmed.isEmpty) return;
    this.stmt.appendJournal.run(id, id, encodeBitmap(setWritten), encodeBitmap(setTrimmed));
    const { n } = this.stmt.journalCount.get(id) as { n: number };
    if (n >= JOURNAL_FOLD_THRESHOLD) this.foldJournal(id);
  }

  /** The committed bitmaps of one layer. */
  storedBitmaps(id: number): StoredBitmaps {
    const row = this.stmt.layerRow.get(id) as LayerRow | undefined;
    const stored = { written: decodeBitmap(row?.written), trimmed: decodeBitmap(row?.trimmed) };
    for (const j of this.stmt.journalRows.all(id) as JournalRow[]) {
      applyJournal(stored, decodeBitmap(j.set_written), decodeBitmap(j.set_trimmed));
    }
    return stored;
  }

  /** Rewrites a layer's row from its committed state (row plus journal) and drops the journal. */
  private foldJournal(id: number): void {
    const stored = this.storedBitmaps(id);
    this.stmt.setLayerBitmaps.run(encodeBitmap(stored.written), encodeBitmap(stored.trimmed), id);
    this.stmt.deleteJournal.run(id);
  }

  allLayers(): LayerRow[] {
    return this.stmt.allLayers.all() as LayerRow[];
  }

  /** Every layer with its committed bitmaps, read in two queries however many layers there are (store open). */
  loadLayers(): StoredLayer[] {
    const layers = new Map<number, StoredLayer>();
    for (const row of this.stmt.allLayers.iterate() as Iterable<LayerRow>) {
      layers.set(row.id, {
        id: row.id,
        parentId: row.parent_id,
        blockSize: row.block_size,
        frozen: row.frozen === 1,
        written: decodeBitmap(row.written),
        trimmed: decodeBitmap(row.trimmed),
      });
    }
    for (const j of this.stmt.allJournalRows.iterate() as Iterable<JournalRow>) {
      const layer = layers.get(j.layer_id);
      if (layer) applyJournal(layer, decodeBitmap(j.set_written), decodeBitmap(j.set_trimmed));
    }
    return [...layers.values()];
  }

  insertVolume(row: VolumeRow): void {
    this.stmt.insertVolume.run(row);
  }

  deleteVolume(id: string): void {
    this.stmt.deleteVolume.run(id);
  }

  setVolumeHead(id: string, layerId: number): void {
    this.stmt.setVolumeHead.run(layerId, id);
  }

  setVolumeCapacity(id: string, capacityBytes: number): void {
    this.transaction(() => this.stmt.setVolumeCapacity.run(capacityBytes, id));
  }

  setVolumeAttributes(id: string, attributes: string): void {
    this.transaction(() => this.stmt.setVolumeAttributes.run(attributes, id));
  }

  allVolumes(): VolumeRow[] {
    return this.stmt.allVolumes.all() as VolumeRow[];
  }

  insertSnapshot(row: SnapshotRow): void {
    this.stmt.insertSnapshot.run(row);
  }

  deleteSnapshot(id: string): void {
    this.transaction(() => this.stmt.deleteSnapshot.run(id));
  }

  allSnapshots(): SnapshotRow[] {
    return this.stmt.allSnapshots.all() as SnapshotRow[];
  }

  insertTombstone(row: TombstoneRow): void {
    this.stmt.insertTombstone.run(row);
  }

  /** Stores a tombstone's anchor and bits (after a merge, or a write to a live anchor), or expires it (`changed` null). */
  moveTombstone(snapshotId: string, anchorLayerId: number, changed: Bitmap | null, excluded: Bitmap | null): void {
    const expired = changed === null;
    this.stmt.moveTombstone.run(
      anchorLayerId,
      expired ? null : encodeBitmap(changed),
      expired ? 1 : 0,
      !expired && excluded !== null ? 1 : 0,
      !expired && excluded !== null ? encodeBitmap(excluded) : null,
      snapshotId,
    );
  }

  deleteTombstone(snapshotId: string): void {
    this.stmt.deleteTombstone.run(snapshotId);
  }

  insertGroup(row: GroupRow): void {
    this.stmt.insertGroup.run(row.id, row.name, row.created_at_ms);
    for (const [i, snapshotId] of row.snapshot_ids.entries()) this.stmt.insertGroupMember.run(snapshotId, row.id, i);
  }

  deleteGroup(id: string): void {
    this.stmt.deleteGroupMembers.run(id);
    this.stmt.deleteGroup.run(id);
  }

  allGroups(): GroupRow[] {
    const groups = new Map<string, GroupRow>();
    for (const g of this.stmt.allGroups.all() as Array<{ id: string; name: string | null; created_at_ms: number }>) {
      groups.set(g.id, { ...g, snapshot_ids: [] });
    }
    for (const m of this.stmt.allGroupMembers.all() as Array<{ snapshot_id: string; group_id: string }>) {
      groups.get(m.group_id)?.snapshot_ids.push(m.snapshot_id);
    }
    return [...groups.values()];
  }

  allTombstones(): TombstoneRow[] {
    return this.stmt.allTombstones.all() as TombstoneRow[];
  }

  close(): void {
    if (this.db.open) this.db.close();
  }
}
