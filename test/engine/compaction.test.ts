/**
 * Compaction: deleting snapshots hides their layers, and compact() merges hidden layers upward or
 * drops unreferenced ones. Whatever is deleted, in whatever order, every remaining snapshot must
 * read the same bytes and report the same delta and allocated extents as before (invariant 2), the
 * live volumes must keep their content, and the space of overwritten blocks must be given back.
 */
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, test } from 'vitest';
import type { BlockStore } from '../../storage-engine/index.js';
import type { ExtentQueryOptions, SnapshotInfo, StoreOptions, VolumeInfo } from '../../storage-engine/types.js';
import {
  collect,
  expectSameBytes,
  extentsOf,
  layerFiles,
  modelAllocated,
  modelDelta,
  ModelVolume,
  pattern,
  related,
  sha256,
  tick,
  useTempStores,
  type ModelSnap,
} from './support/example-support.js';

const stores = useTempStores();

const B = 4096;
const V_BLOCKS = 128;
const C_BLOCKS = 160;

interface Snap {
  info: SnapshotInfo;
  model: ModelSnap;
}

/** A volume V with snapshots s1..s5, a clone C of s3 with snapshots c1, c2, and unflushed head writes on both. */
interface History {
  store: BlockStore;
  dir: string;
  volumes: Map<string, { info: VolumeInfo; model: ModelVolume }>;
  snaps: Map<string, Snap>;
}

function snapOf(h: History, label: string): Snap {
  const s = h.snaps.get(label);
  if (!s) throw new Error(`no snapshot ${label}`);
  return s;
}

function volOf(h: History, label: string): { info: VolumeInfo; model: ModelVolume } {
  const v = h.volumes.get(label);
  if (!v) throw new Error(`no volume ${label}`);
  return v;
}

async function buildHistory(options: StoreOptions = {}): Promise<History> {
  const { store, dir } = stores.open({ autoCompact: false, ...options });
  const h: History = { store, dir, volumes: new Map(), snaps: new Map() };
  const vInfo = await store.createVolume({ name: 'V', capacityBytes: V_BLOCKS * B, blockSize: B });
  h.volumes.set('V', { info: vInfo, model: new ModelVolume(B, V_BLOCKS * B) });

  let seed = 100;
  const w = (vol: string, offset: number, length: number): void => {
    const v = volOf(h, vol);
    const data = pattern(seed++, length);
    store.write(v.info.id, offset, data);
    v.model.write(offset, data);
  };
  const t = (vol: string, offset: number, length: number): void => {
    const v = volOf(h, vol);
    store.trim(v.info.id, offset, length);
    v.model.trim(offset, length);
  };
  const snap = async (vol: string, label: string): Promise<void> => {
    const v = volOf(h, vol);
    const info = await store.createSnapshot({ volumeId: v.info.id, name: label });
    h.snaps.set(label, { info, model: v.model.snapshot() });
  };

  w('V', 0, 32 * B);
  w('V', 64 * B, 64 * B);
  await snap('V', 's1');
  w('V', 64 * B, 64 * B); // overwrites everything s1 wrote in 64..127
  w('V', 5 * B + 100, 300);
  t('V', 10 * B, 4 * B);
  await snap('V', 's2');
  w('V', 20 * B + 1000, 6 * B);
  t('V', 2 * B + 10, 100);
  w('V', 127 * B, B);
  await snap('V', 's3');

  const s3 = snapOf(h, 's3');
  const cInfo = await store.createVolume({ name: 'C', sourceSnapshotId: s3.info.id, capacityBytes: C_BLOCKS * B });
  h.volumes.set('C', { info: cInfo, model: ModelVolume.cloneOf(s3.model, C_BLOCKS * B) });
  w('C', 0, 4 * B);
  await snap('C', 'c1');
  w('C', 150 * B, 6 * B);
  w('C', 64 * B, 7 * B);
  await snap('C', 'c2');
  w('C', 3 * B + 5, 10);

  w('V', 40 * B, 11 * B);
  t('V', 0, 4 * B);
  await snap('V', 's4');
  w('V', 64 * B, 64 * B);
  w('V', 45 * B, 2 * B);
  await snap('V', 's5');
  w('V', 0, 6 * B);
  t('V', 100 * B, 2 * B);
  return h;
}

const QUERIES: Array<{ key: string; options: ExtentQueryOptions }> = [
  { key: 'FIXED', options: { style: 'FIXED' } },
  { key: 'VARIABLE', options: { style: 'VARIABLE' } },
  // Starting inside block 22 (in s3's run 20..26) and block 45 (inside s4's run 40..50).
  {
    key: 'FIXED from mid-block 22 in batches of 3',
    options: { style: 'FIXED', startingOffset: 22 * B + 5, batchSize: 3 },
  },
  {
    key: 'VARIABLE from mid-block 45 in batches of 2',
    options: { style: 'VARIABLE', startingOffset: 45 * B + 5, batchSize: 2 },
  },
];

/** Every observable result for the given snapshots and live volumes: contents, allocated, and deltas of related pairs. */
async function record(h: History, snapLabels: string[], volLabels: string[]): Promise<Map<string, unknown>> {
  const { store } = h;
  const out = new Map<string, unknown>();
  for (const l of volLabels) {
    const v = volOf(h, l);
    out.set(`content of volume ${l}`, sha256(store.read(v.info.id, 0, v.info.capacityBytes)));
  }
  for (const l of snapLabels) {
    const s = snapOf(h, l);
    out.set(`content of ${l}`, sha256(store.readSnapshot(s.info.id, 0, s.info.capacityBytes)));
    for (const q of QUERIES) {
      out.set(`allocated ${l} ${q.key}`, await collect(store.allocated(s.info.id, q.options), q.options.batchSize));
    }
  }
  for (const a of snapLabels) {
    for (const b of snapLabels) {
      const base = snapOf(h, a);
      const target = snapOf(h, b);
      if (!related(base.model, target.model)) continue;
      for (const q of QUERIES) {
        out.set(
          `delta ${a}->${b} ${q.key}`,
          await collect(store.delta(base.info.id, target.info.id, q.options), q.options.batchSize),
        );
      }
    }
  }
  return out;
}

/** Checks the engine's results against the chain model, so that "unchanged" also means "right". */
async function expectMatchesModel(h: History, snapLabels: string[], volLabels: string[]): Promise<void> {
  const { store } = h;
  for (const l of volLabels) {
    const v = volOf(h, l);
    expectSameBytes(store.read(v.info.id, 0, v.info.capacityBytes), v.model.content, `volume ${l}`);
  }
  for (const l of snapLabels) {
    const s = snapOf(h, l);
    expectSameBytes(store.readSnapshot(s.info.id, 0, s.info.capacityBytes), s.model.content, `snapshot ${l}`);
    for (const q of QUERIES) {
      expect(await collect(store.allocated(s.info.id, q.options)), `allocated ${l} ${q.key}`).toEqual(
        extentsOf(modelAllocated(s.model), B, q.options.style ?? 'VARIABLE', q.options.startingOffset),
      );
    }
  }
  for (const a of snapLabels) {
    for (const b of snapLabels) {
      const base = snapOf(h, a);
      const target = snapOf(h, b);
      if (!related(base.model, target.model)) continue;
      for (const q of QUERIES) {
        expect(
          await collect(store.delta(base.info.id, target.info.id, q.options)),
          `delta ${a}->${b} ${q.key}`,
        ).toEqual(
          extentsOf(modelDelta(base.model, target.model), B, q.options.style ?? 'VARIABLE', q.options.startingOffset),
        );
      }
    }
  }
}

const ALL_SNAPS = ['s1', 's2', 's3', 's4', 's5', 'c1', 'c2'];

interface Scenario {
  /** Snapshots deleted, in this order. */
  snapshots: string[];
  /** Volumes deleted first. */
  volumes?: string[];
  /** Deleted snapshots whose layer another branch builds on (a clone's source): it may stay hidden. */
  sharedLayers: number;
}

const scenarios: Array<[string, Scenario]> = [
  ['the first snapshot', { snapshots: ['s1'], sharedLayers: 0 }],
  ['a middle snapshot', { snapshots: ['s2'], sharedLayers: 0 }],
  ['the last snapshot (its layer merges into the live head)', { snapshots: ['s5'], sharedLayers: 0 }],
  ["the clone's source snapshot", { snapshots: ['s3'], sharedLayers: 1 }],
  ["the clone's snapshots, newest first", { snapshots: ['c2', 'c1'], sharedLayers: 0 }],
  ['two adjacent snapshots, oldest first', { snapshots: ['s1', 's2'], sharedLayers: 0 }],
  ['two non-adjacent snapshots, newest first', { snapshots: ['s4', 's2'], sharedLayers: 0 }],
  ['all but one, oldest first', { snapshots: ['s1', 's2', 's3', 's4', 's5', 'c1'], sharedLayers: 1 }],
  ['all but one, newest first', { snapshots: ['c2', 'c1', 's5', 's3', 's2', 's1'], sharedLayers: 1 }],
  ['every snapshot', { snapshots: ['s3', 's1', 'c1', 's5', 'c2', 's2', 's4'], sharedLayers: 1 }],
  ['the original volume, then its middle snapshot', { volumes: ['V'], snapshots: ['s4'], sharedLayers: 0 }],
  ['the original volume, then its last snapshot', { volumes: ['V'], snapshots: ['s5'], sharedLayers: 0 }],
];

/** An open store keeps one empty file made ahead for its next layer (the spare); a closed one keeps none. */
function expectOnlyTheSpare(dir: string): void {
  const files = layerFiles(dir);
  expect(files).toHaveLength(1);
  expect(fs.statSync(path.join(dir, 'layers', files[0]!)).size).toBe(0);
}

describe('compaction keeps what remains exactly as it was', () => {
  test.each(scenarios)(
    "deleting %s and compacting changes no remaining snapshot's content, allocated or delta, nor the live volumes, also after reopening",
    async (_what, sc) => {
      const h = await buildHistory();
      const remainingSnaps = ALL_SNAPS.filter((l) => !sc.snapshots.includes(l));
      const remainingVols = ['V', 'C'].filter((l) => !(sc.volumes ?? []).includes(l));
      await expectMatchesModel(h, ALL_SNAPS, ['V', 'C']);
      const before = await record(h, remainingSnaps, remainingVols);

      for (const l of sc.volumes ?? []) await h.store.deleteVolume(volOf(h, l).info.id);
      for (const l of sc.snapshots) await h.store.deleteSnapshot(snapOf(h, l).info.id);
      const usageBefore = h.store.spaceUsage();
      expect(usageBefore.snapshots).toBe(remainingSnaps.length);
      expect(usageBefore.hiddenLayers).toBeGreaterThanOrEqual(sc.snapshots.length);

      const report = await h.store.compact();
      const usageAfter = h.store.spaceUsage();

      expect(await record(h, remainingSnaps, remainingVols)).toEqual(before);
      await expectMatchesModel(h, remainingSnaps, remainingVols);

      // Hidden layers go away unless another branch still builds on them.
      expect(usageAfter.hiddenLayers).toBeLessThanOrEqual(sc.sharedLayers);
      if (sc.snapshots.length > sc.sharedLayers) expect(usageAfter.layers).toBeLessThan(usageBefore.layers);
      expect(usageBefore.layers - usageAfter.layers).toBe(report.merged + report.dropped);
      expect(usageAfter.layerBytes).toBeLessThanOrEqual(usageBefore.layerBytes);

      // compact() resolves when nothing is left to do: a second pass has nothing to do.
      expect(await h.store.compact()).toEqual({ merged: 0, dropped: 0, blocksCopied: 0 });

      await h.store.close();
      h.store = stores.reopen(h.dir, { autoCompact: false });
      expect(await record(h, remainingSnaps, remainingVols)).toEqual(before);
      const usageReopened = h.store.spaceUsage();
      expect(usageReopened.layers).toBe(usageAfter.layers);
      expect(usageReopened.hiddenLayers).toBe(usageAfter.hiddenLayers);
      expect(usageReopened.snapshots).toBe(remainingSnaps.length);
    },
  );
});

describe('compaction gives space back', () => {
  test("merging the first snapshot's layer copies only the blocks the next layer does not override and frees the rest", async () => {
    const h = await buildHistory();
    const s1 = snapOf(h, 's1');
    const s2 = snapOf(h, 's2');
    const hidden = s1.model.chain[0];
    const next = s2.model.chain[1];
    if (!hidden || !next) throw new Error('model chain too short');
    const overridden = [...hidden.keys()].filter((b) => next.has(b)).length;
    const kept = hidden.size - overridden;
    expect(overridden).toBeGreaterThanOrEqual(64);

    await h.store.deleteSnapshot(s1.info.id);
    const before = h.store.spaceUsage();
    const report = await h.store.compact();
    const after = h.store.spaceUsage();

    expect(report.merged).toBe(1);
    expect(report.blocksCopied).toBe(kept);
    expect(after.hiddenLayers).toBe(0);
    expect(after.layers).toBe(before.layers - 1);
    // The overridden blocks' bytes are gone from disk (allow one block of allocation slack).
    expect(before.layerBytes - after.layerBytes).toBeGreaterThanOrEqual((overridden - 1) * B);
    await expectMatchesModel(
      h,
      ALL_SNAPS.filter((l) => l !== 's1'),
      ['V', 'C'],
    );
  });

  test("a clone's source layer stays hidden while the clone builds on it, and merges once the clone is gone", async () => {
    const h = await buildHistory();
    await h.store.deleteSnapshot(snapOf(h, 's3').info.id);
    await h.store.compact();
    expect(h.store.spaceUsage().hiddenLayers).toBe(1);
    await expectMatchesModel(h, ['s1', 's2', 's4', 's5', 'c1', 'c2'], ['V', 'C']);
    const before = await record(h, ['s1', 's2', 's4', 's5'], ['V']);

    await h.store.deleteVolume(volOf(h, 'C').info.id);
    await h.store.deleteSnapshot(snapOf(h, 'c1').info.id);
    await h.store.deleteSnapshot(snapOf(h, 'c2').info.id);
    const usageBefore = h.store.spaceUsage();
    const report = await h.store.compact();
    const usageAfter = h.store.spaceUsage();

    expect(usageAfter.hiddenLayers).toBe(0);
    expect(report.merged + report.dropped).toBe(usageBefore.layers - usageAfter.layers);
    expect(await record(h, ['s1', 's2', 's4', 's5'], ['V'])).toEqual(before);
  });

  test('hidden layers survive a close and reopen, and compacting afterwards keeps everything', async () => {
    const h = await buildHistory();
    const remaining = ['s1', 's3', 's5', 'c2'];
    const before = await record(h, remaining, ['V', 'C']);
    for (const l of ['s2', 's4', 'c1']) await h.store.deleteSnapshot(snapOf(h, l).info.id);
    const hidden = h.store.spaceUsage().hiddenLayers;
    expect(hidden).toBe(3);
    await h.store.close();
    h.store = stores.reopen(h.dir, { autoCompact: false });
    expect(h.store.spaceUsage().hiddenLayers).toBe(hidden);
    expect(await record(h, remaining, ['V', 'C'])).toEqual(before);
    const report = await h.store.compact();
    expect(report.merged).toBe(3);
    expect(h.store.spaceUsage().hiddenLayers).toBe(0);
    expect(await record(h, remaining, ['V', 'C'])).toEqual(before);
    await expectMatchesModel(h, remaining, ['V', 'C']);
  });

  test("a volume clone's shared frozen layer merges into the clone once the source volume and its snapshots are gone", async () => {
    const { store } = stores.open({ autoCompact: false });
    const v = await store.createVolume({ capacityBytes: 64 * B, blockSize: B });
    const vModel = new ModelVolume(B, 64 * B);
    const data = pattern(1, 20 * B);
    store.write(v.id, 3 * B + 9, data);
    vModel.write(3 * B + 9, data);
    const s1 = await store.createSnapshot({ volumeId: v.id });
    vModel.snapshot();
    const more = pattern(2, 5 * B);
    store.write(v.id, 10 * B, more);
    vModel.write(10 * B, more);
    const c = await store.createVolume({ sourceVolumeId: v.id, capacityBytes: 64 * B });
    const cModel = vModel.cloneVolume();
    const mine = pattern(3, B);
    store.write(c.id, 30 * B, mine);
    cModel.write(30 * B, mine);
    // The frozen source head is shared by both volumes: it cannot merge yet.
    await store.compact();
    expectSameBytes(store.read(c.id, 0, 64 * B), cModel.content, 'clone');

    await store.deleteVolume(v.id);
    await store.deleteSnapshot(s1.id);
    const before = store.spaceUsage();
    expect(before.hiddenLayers).toBeGreaterThanOrEqual(2);
    await store.compact();
    const after = store.spaceUsage();
    expect(after.hiddenLayers).toBe(0);
    // Only the clone's head is left.
    expect(after.layers).toBe(1);
    expectSameBytes(store.read(c.id, 0, 64 * B), cModel.content, 'clone after compaction');
    const cs = await store.createSnapshot({ volumeId: c.id });
    expect(await collect(store.allocated(cs.id, { style: 'FIXED' }))).toEqual(
      extentsOf(modelAllocated(cModel.snapshot()), B, 'FIXED'),
    );
  });

  test.each([
    ['volume first, then snapshots oldest first', ['V', 's1', 's2', 's3', 's4', 's5']],
    ['snapshots newest first, then the volume', ['s5', 's4', 's3', 's2', 's1', 'V']],
    ['interleaved', ['s3', 'V', 's1', 's5', 's2', 's4']],
  ])('deleting a volume and all its snapshots (%s) leaves no layer files once compacted', async (_what, order) => {
    const { store, dir } = stores.open({ autoCompact: false });
    const v = await store.createVolume({ capacityBytes: 64 * B });
    const ids = new Map<string, string>([['V', v.id]]);
    for (let i = 1; i <= 5; i++) {
      store.write(v.id, ((i * 7) % 64) * B + i, pattern(i, 9 * B));
      ids.set(`s${i}`, (await store.createSnapshot({ volumeId: v.id })).id);
    }
    store.write(v.id, 0, pattern(99, 3 * B));
    await store.flush(v.id);
    expect(layerFiles(dir).length).toBeGreaterThan(0);

    for (const l of order) {
      const id = ids.get(l);
      if (!id) throw new Error(l);
      if (l === 'V') await store.deleteVolume(id);
      else await store.deleteSnapshot(id);
    }
    await store.compact();
    const usage = store.spaceUsage();
    expect(usage).toMatchObject({
      volumes: 0,
      snapshots: 0,
      layers: 0,
      hiddenLayers: 0,
      layerBytes: 0,
      provisionedBytes: 0,
    });
    expectOnlyTheSpare(dir);
    await store.close();
    expect(layerFiles(dir)).toEqual([]);
  });

  test('deleting both branches of a clone and all snapshots leaves no layer files once compacted', async () => {
    const h = await buildHistory();
    await h.store.deleteSnapshot(snapOf(h, 's3').info.id);
    await h.store.deleteVolume(volOf(h, 'V').info.id);
    for (const l of ['c1', 's1', 's5', 'c2', 's2', 's4']) await h.store.deleteSnapshot(snapOf(h, l).info.id);
    await h.store.compact();
    // C is the last one holding the shared layers.
    await expectMatchesModel(h, [], ['C']);
    await h.store.deleteVolume(volOf(h, 'C').info.id);
    await h.store.compact();
    expect(h.store.spaceUsage()).toMatchObject({ layers: 0, hiddenLayers: 0, layerBytes: 0 });
    expectOnlyTheSpare(h.dir);
    await h.store.close();
    expect(layerFiles(h.dir)).toEqual([]);
  });

  test('with autoCompact on, a deleted snapshot is compacted in the background and close waits for it', async () => {
    const h = await buildHistory({ autoCompact: true });
    const remaining = ALL_SNAPS.filter((l) => l !== 's2' && l !== 's4');
    const before = await record(h, remaining, ['V', 'C']);
    await h.store.deleteSnapshot(snapOf(h, 's2').info.id);
    await h.store.deleteSnapshot(snapOf(h, 's4').info.id);
    const deadline = Date.now() + 20_000;
    while (h.store.spaceUsage().hiddenLayers > 0 && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 50));
    }
    expect(h.store.spaceUsage().hiddenLayers).toBe(0);
    expect(await record(h, remaining, ['V', 'C'])).toEqual(before);
    await h.store.close();
    h.store = stores.reopen(h.dir, { autoCompact: false });
    expect(h.store.spaceUsage().hiddenLayers).toBe(0);
    expect(await record(h, remaining, ['V', 'C'])).toEqual(before);
  });
});

describe('compaction concurrent with I/O', () => {
  test.each([
    ['with no snapshot taken meanwhile', false],
    ['with a snapshot taken a few turns into the merge into the head, freezing the layer being merged into', true],
  ])(
    'writes, trims and flushes issued while compaction merges into the live head lose nothing (%s)',
    async (_what, snapshotMidway) => {
      const { store, dir } = stores.open({ autoCompact: false });
      // Big enough that both merges (s1's layer into s2's, then that into the head) take many copy chunks.
      const blocks = 16384;
      const info = await store.createVolume({ capacityBytes: blocks * B, blockSize: B });
      const model = new ModelVolume(B, blocks * B);
      const write = (offset: number, data: Buffer): void => {
        store.write(info.id, offset, data);
        model.write(offset, data);
      };
      write(0, pattern(1, 8192 * B));
      const s1 = await store.createSnapshot({ volumeId: info.id });
      model.snapshot();
      write(4096 * B, pattern(2, 4096 * B));
      write(12000 * B + 17, pattern(3, 5 * B));
      const s2 = await store.createSnapshot({ volumeId: info.id });
      model.snapshot();
      await store.deleteSnapshot(s1.id);
      await store.deleteSnapshot(s2.id);

      let settled = false;
      const compaction = store.compact().finally(() => {
        settled = true;
      });
      let mid: { id: string; model: ModelSnap } | undefined;
      let rng = 12345;
      const next = (n: number): number => {
        rng ^= rng << 13;
        rng ^= rng >>> 17;
        rng ^= rng << 5;
        return (rng >>> 0) % n;
      };
      let headMergeTurns = 0;
      for (let i = 0; (!settled || i < 64) && i < 5000; i++) {
        // Several operations a turn, mostly inside the range being merged, unaligned, sometimes spanning blocks.
        for (let k = 0; k < 8; k++) {
          const offset = next(8300 * B);
          if (k === 4) {
            const length = next(3 * B) + 1;
            store.trim(info.id, offset, length);
            model.trim(offset, length);
          } else {
            write(offset, pattern(1000 + 8 * i + k, next(3 * B) + 1));
          }
        }
        // Once only the merge into the head is left (one hidden layer), count turns.
        const inHeadMerge = !settled && store.spaceUsage().hiddenLayers === 1;
        if (inHeadMerge) headMergeTurns++;
        // Flushes wait on fsync, during which compaction runs freely; none before the merge into the head
        // has been overlapped for a few turns, so a slow disk cannot let it finish unobserved.
        if (headMergeTurns >= 3 && i % 3 === 0) await store.flush(info.id);
        if (snapshotMidway && inHeadMerge && headMergeTurns === 3) {
          const snap = await store.createSnapshot({ volumeId: info.id });
          mid = { id: snap.id, model: model.snapshot() };
        }
        await tick();
      }
      const report = await compaction;
      expect(report.merged).toBe(2);
      // The loop must really have overlapped the merge into the head, or this test proves nothing.
      expect(headMergeTurns).toBeGreaterThanOrEqual(3);
      if (snapshotMidway && !mid) throw new Error('no snapshot was taken during the merge into the head');
      await store.compact();

      expectSameBytes(store.read(info.id, 0, blocks * B), model.content, 'live volume after concurrent compaction');
      if (mid)
        expectSameBytes(
          store.readSnapshot(mid.id, 0, blocks * B),
          mid.model.content,
          'snapshot taken during compaction',
        );
      const end = await store.createSnapshot({ volumeId: info.id });
      const endModel = model.snapshot();
      expect(await collect(store.allocated(end.id))).toEqual(extentsOf(modelAllocated(endModel), B, 'VARIABLE'));
      if (mid) {
        expect(await collect(store.delta(mid.id, end.id, { style: 'FIXED' }))).toEqual(
          extentsOf(modelDelta(mid.model, endModel), B, 'FIXED'),
        );
      }

      await store.close();
      const reopened = stores.reopen(dir, { autoCompact: false });
      expectSameBytes(reopened.read(info.id, 0, blocks * B), model.content, 'live volume after reopen');
      if (mid)
        expectSameBytes(reopened.readSnapshot(mid.id, 0, blocks * B), mid.model.content, 'mid snapshot after reopen');
    },
  );
});

describe('compaction that is interrupted', () => {
  test('layers frozen by snapshots while a background merge runs survive that merge being abandoned at close', async () => {
    const MiB = 1024 * 1024;
    const { store, dir } = stores.open();
    const v0 = await store.createVolume({ capacityBytes: 16 * MiB });
    store.write(v0.id, 0, Buffer.alloc(16 * MiB, 1));
    const v1 = await store.createVolume({ capacityBytes: 16 * MiB, sourceVolumeId: v0.id });
    // Deleting the source leaves its frozen layer hidden under v1's head: a background merge into it starts.
    await store.deleteVolume(v0.id);
    for (let i = 0; i < 3; i++) await tick();
    store.write(v1.id, 0, Buffer.alloc(B, 2));
    const s1 = await store.createSnapshot({ volumeId: v1.id });
    const s2 = await store.createSnapshot({ volumeId: v1.id });
    await store.close();

    const reopened = stores.reopen(dir, { autoCompact: false });
    const expected = Buffer.alloc(16 * MiB, 1);
    expected.fill(2, 0, B);
    expectSameBytes(reopened.readSnapshot(s1.id, 0, 16 * MiB), expected, 's1 after reopen');
    expectSameBytes(reopened.readSnapshot(s2.id, 0, 16 * MiB), expected, 's2 after reopen');
    expect(new Set(layerFiles(dir)).size).toBe(reopened.spaceUsage().layers);
    await reopened.compact();
    expectSameBytes(reopened.readSnapshot(s2.id, 0, 16 * MiB), expected, 's2 after compaction');
  });
});
