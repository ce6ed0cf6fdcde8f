/**
 * A full disk under the store: anything that needs space is refused with NoSpaceError, deletes still
 * commit (the space reserve is given back for them) and free space, compaction that could not run for
 * lack of space is reported and retried until it succeeds, and nothing stored is lost or changed.
 * Runs on a real, small ext4 filesystem (root and loop devices; skipped without them, failing under CI=true).
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { BlockStore, NoSpaceError, type StoreEvent, type StoreOptions } from '../../storage-engine/index.js';
import { RESERVE_FILE } from '../../storage-engine/space-reserve.js';
import { MiB, exhaustCatalog, fillUntilFull, fingerprint, writeChunks } from '../support/fill-store.js';
import { missingSmallFileSystem, mountSmallExt4, type SmallFileSystem } from '../support/small-filesystem.js';
import { caught, expectEngineError } from './support/example-support.js';

const missing = missingSmallFileSystem();
const mustRun = process.env.CI === 'true';
const VOLUME = 256 * MiB;
/** What the fingerprints cover: every byte any test writes to volume a. */
const SPAN = 32 * MiB;

interface FullStore {
  fs: SmallFileSystem;
  dir: string;
  store: BlockStore;
  events: StoreEvent[];
  options: StoreOptions;
  a: string;
  /** Snapshot of a with 8 MiB at 0; merging it into s2's layer copies those 8 MiB. */
  s1: string;
  /** Snapshot of a with 8 MiB more at 16 MiB. */
  s2: string;
  /** Volume b, written until the disk was full. */
  b: string;
  /** A file beside the store, removed to free space behind the store's back. */
  ballast: string;
  /** Fingerprints of everything stored, taken when the disk became full. */
  before: Record<string, string>;
}

const opened: FullStore[] = [];
afterEach(async () => {
  for (const f of opened.splice(0)) {
    await f.store.close().catch(() => undefined);
    f.fs.remove();
  }
});

/** A store on a 64 MiB ext4 filesystem made full by writes to volume b, with snapshot history on volume a. */
async function fullStore(extra: StoreOptions = {}, ballastMiB = 0): Promise<FullStore> {
  const small = mountSmallExt4({ sizeBytes: 64 * 1024 * 1024 });
  const dir = path.join(small.dir, 'store');
  const events: StoreEvent[] = [];
  const options: StoreOptions = {
    compactionRetry: { firstMs: 50, maxMs: 400 },
    onEvent: (e) => events.push(e),
    ...extra,
  };
  const store = BlockStore.open(dir, options);
  const f = { fs: small, dir, store, events, options } as FullStore;
  opened.push(f);
  f.ballast = path.join(small.dir, 'ballast');
  if (ballastMiB > 0) fs.writeFileSync(f.ballast, Buffer.alloc(ballastMiB * MiB, 1));
  f.a = (await store.createVolume({ name: 'a', capacityBytes: VOLUME })).id;
  await writeChunks(store, f.a, 0, 8, 1);
  f.s1 = (await store.createSnapshot({ volumeId: f.a, name: 's1' })).id;
  await writeChunks(store, f.a, 16 * MiB, 8, 2);
  f.s2 = (await store.createSnapshot({ volumeId: f.a, name: 's2' })).id;
  f.b = (await store.createVolume({ name: 'b', capacityBytes: VOLUME })).id;
  const filled = await fillUntilFull(store, f.b, 3);
  expect(filled).toBeGreaterThan(4);
  await exhaustCatalog(store, f.b);
  f.before = fingerprints(f);
  return f;
}

function fingerprints(f: FullStore): Record<string, string> {
  const out: Record<string, string> = {
    a: fingerprint(f.store, { volumeId: f.a }, SPAN),
    s2: fingerprint(f.store, { snapshotId: f.s2 }, SPAN),
  };
  if (f.store.listSnapshots().some((s) => s.id === f.s1)) out.s1 = fingerprint(f.store, { snapshotId: f.s1 }, SPAN);
  return out;
}

function expectUnchanged(f: FullStore): void {
  const now = fingerprints(f);
  for (const [k, v] of Object.entries(now)) expect(v, `${k} reads as before`).toBe(f.before[k]);
}

async function until(what: string, done: () => boolean, timeoutMs = 15_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!done()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting until ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

describe.skipIf(missing !== undefined && !mustRun)(
  `a full disk under the store${missing ? ` (skipped: ${missing})` : ''}`,
  () => {
    beforeAll(() => {
      if (missing) throw new Error(`CI=true but the full-disk tests cannot run: ${missing}`);
    });

    it('creating a volume, a clone or a snapshot is refused with NoSpaceError; a create repeated by name still answers; nothing stored changes', async () => {
      const f = await fullStore();
      await expectEngineError(() => f.store.createVolume({ capacityBytes: MiB }), NoSpaceError, 'NO_SPACE');
      await expectEngineError(
        () => f.store.createVolume({ capacityBytes: VOLUME, sourceSnapshotId: f.s2 }),
        NoSpaceError,
        'NO_SPACE',
      );
      await expectEngineError(
        () => f.store.createVolume({ capacityBytes: VOLUME, sourceVolumeId: f.a }),
        NoSpaceError,
        'NO_SPACE',
      );
      await expectEngineError(() => f.store.createSnapshot({ volumeId: f.a }), NoSpaceError, 'NO_SPACE');
      expect((await f.store.createVolume({ name: 'a', capacityBytes: VOLUME })).id).toBe(f.a);
      expect((await f.store.createSnapshot({ volumeId: f.a, name: 's2' })).id).toBe(f.s2);
      expect(f.store.listVolumes()).toHaveLength(2);
      expect(f.store.listSnapshots()).toHaveLength(2);
      expectUnchanged(f);
    });

    it('the store closes and opens again on the full disk, reading the same', async () => {
      const f = await fullStore();
      await f.store.close();
      f.store = BlockStore.open(f.dir, f.options);
      expectUnchanged(f);
      await expectEngineError(() => f.store.createSnapshot({ volumeId: f.a }), NoSpaceError, 'NO_SPACE');
    });

    it('deleting a snapshot and a volume succeeds and gives the space back; the reserve is taken again and creates work again', async () => {
      const f = await fullStore();
      const freeBefore = f.fs.freeBytes();
      const eventsBefore = f.events.length;
      await f.store.deleteSnapshot(f.s1);
      await f.store.deleteVolume(f.b);
      await until('compaction has merged the deleted snapshot', () => f.store.spaceUsage().hiddenLayers === 0);
      await f.store.compact();
      expect(f.fs.freeBytes() - freeBefore).toBeGreaterThan(16 * MiB);
      const reserve = fs.statSync(path.join(f.dir, RESERVE_FILE));
      expect(reserve.mode & 0o777).toBe(0o600);
      expect(reserve.blocks * 512).toBeGreaterThanOrEqual(reserve.size);
      expect(reserve.size).toBeGreaterThan(0);
      const since = f.events.slice(eventsBefore);
      const released = since.filter((e) => e.type === 'space-reserve-released').length;
      const restored = since.filter((e) => e.type === 'space-reserve-restored').length;
      expect(restored).toBe(released);
      delete f.before.s1;
      expectUnchanged(f);
      const c = await f.store.createVolume({ capacityBytes: MiB });
      await f.store.createSnapshot({ volumeId: c.id });
    });

    it('a merge that fails for lack of space is reported, retried with growing delays, and completes once space is freed', async () => {
      const f = await fullStore({}, 12);
      await f.store.deleteSnapshot(f.s1);
      await until('two failed attempts', () => f.events.filter((e) => e.type === 'compaction-failed').length >= 2);
      const failures = f.events.filter(
        (e): e is Extract<StoreEvent, { type: 'compaction-failed' }> => e.type === 'compaction-failed',
      );
      expect(failures[0]!.noSpace).toBe(true);
      expect(failures[0]!.error).toBeInstanceOf(NoSpaceError);
      expect(failures[1]!.failures).toBe(2);
      expect(failures[1]!.retryInMs).toBe(2 * failures[0]!.retryInMs!);
      expect(f.store.spaceUsage().hiddenLayers).toBe(1);
      // Space comes back without the store hearing of it: only the retries can notice.
      fs.rmSync(f.ballast);
      await until('compaction recovered', () => f.events.some((e) => e.type === 'compaction-recovered'));
      expect(f.store.spaceUsage().hiddenLayers).toBe(0);
      delete f.before.s1;
      expectUnchanged(f);
      await f.store.close();
      f.store = BlockStore.open(f.dir, f.options);
      expectUnchanged(f);
    });

    it("SQLite's 'database or disk is full' is NoSpaceError; a refused commit changes nothing and succeeds once space is back", async () => {
      const f = await fullStore({ spaceReserveBytes: 0 }, 12);
      expect(fs.existsSync(path.join(f.dir, RESERVE_FILE))).toBe(false);
      f.store.trim(f.b, 0, 4096);
      await expectEngineError(() => f.store.flush(f.b), NoSpaceError, 'NO_SPACE');
      // With no reserve to give back, even a delete cannot commit: it is refused and the snapshot stays.
      await expectEngineError(() => f.store.deleteSnapshot(f.s1), NoSpaceError, 'NO_SPACE');
      expect(f.store.listSnapshots().map((s) => s.id)).toContain(f.s1);
      expectUnchanged(f);
      fs.rmSync(f.ballast);
      await f.store.flush(f.b);
      await f.store.deleteSnapshot(f.s1);
      expect(f.store.listSnapshots().map((s) => s.id)).not.toContain(f.s1);
    });

    it('layers nothing references are dropped before any merge, so space comes back even when a merge cannot run', async () => {
      const small = mountSmallExt4({ sizeBytes: 64 * 1024 * 1024 });
      const dir = path.join(small.dir, 'store');
      const store = BlockStore.open(dir, { autoCompact: false });
      const f = { fs: small, dir, store } as FullStore;
      opened.push(f);
      // The merge candidate's layer comes first in the store's order: a pass that merged first would fail on it.
      const a = (await store.createVolume({ capacityBytes: VOLUME })).id;
      await writeChunks(store, a, 0, 8, 1);
      const s1 = (await store.createSnapshot({ volumeId: a })).id;
      await writeChunks(store, a, 16 * MiB, 8, 2);
      await store.createSnapshot({ volumeId: a });
      const d = (await store.createVolume({ capacityBytes: VOLUME })).id;
      await writeChunks(store, d, 0, 6, 4);
      const sd = (await store.createSnapshot({ volumeId: d })).id;
      await store.deleteVolume(d);
      const b = (await store.createVolume({ capacityBytes: VOLUME })).id;
      await fillUntilFull(store, b, 3);
      await exhaustCatalog(store, b);
      await store.deleteSnapshot(s1);
      await store.deleteSnapshot(sd);
      const layers = store.spaceUsage().layers;
      const free = small.freeBytes();
      const err = await caught(() => store.compact());
      expect(err).toBeInstanceOf(NoSpaceError);
      expect(store.spaceUsage().layers).toBe(layers - 1);
      // The dropped layer's file is unlinked in the background.
      await until('the dropped layer gave its space back', () => small.freeBytes() - free >= 5 * MiB);
    });
  },
);
