/**
 * Invariant 8: a deleted snapshot's change record outlives it, so a delta from it stays exact — before
 * compaction, after compaction merged its layer away, through further deletions and after a restart —
 * until retention ends, when the answer is HistoryGoneError ("take a full backup").
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { REPO_ROOT, TSX_LOADER } from '../support/test-driver.js';
import { BlockStore, HistoryGoneError, NotFoundError, type StoreOptions } from '../../storage-engine/index.js';

const B = 4096;
const dirs: string[] = [];
afterEach(() => {
  for (const d of dirs.splice(0)) fs.rmSync(d, { recursive: true, force: true });
});

function open(options: StoreOptions = {}, dir?: string): { store: BlockStore; dir: string } {
  const d = dir ?? fs.mkdtempSync(path.join(os.tmpdir(), 'cbt-tomb-'));
  if (!dir) dirs.push(d);
  return { store: BlockStore.open(d, { autoCompact: false, ...options }), dir: d };
}

async function deltaBlocks(store: BlockStore, base: string, target: string): Promise<number[]> {
  const out: number[] = [];
  for await (const batch of store.delta(base, target, { style: 'FIXED' }))
    for (const e of batch) out.push(e.offset / B);
  return out;
}

/** Writes one block of `fill` at each block index. */
function writeBlocks(store: BlockStore, volumeId: string, blocks: number[], fill: number): void {
  for (const b of blocks) store.write(volumeId, b * B, Buffer.alloc(B, fill));
}

describe('deltas from deleted base snapshots (invariant 8)', () => {
  it('stay exact after the base is deleted, after compaction merges its layer, and after a restart', async () => {
    const { store, dir } = open();
    const v = await store.createVolume({ capacityBytes: 64 * B });
    writeBlocks(store, v.id, [0, 1, 2], 1);
    const s1 = await store.createSnapshot({ volumeId: v.id });
    writeBlocks(store, v.id, [2, 3], 2);
    store.trim(v.id, 10 * B, B);
    const s2 = await store.createSnapshot({ volumeId: v.id });
    writeBlocks(store, v.id, [5], 3);
    const s3 = await store.createSnapshot({ volumeId: v.id });
    const before12 = await deltaBlocks(store, s1.id, s2.id);
    const before13 = await deltaBlocks(store, s1.id, s3.id);
    expect(before12).toEqual([2, 3, 10]);
    expect(before13).toEqual([2, 3, 5, 10]);

    await store.deleteSnapshot(s1.id);
    expect(() => store.getSnapshot(s1.id)).toThrow(NotFoundError);
    expect(await deltaBlocks(store, s1.id, s3.id)).toEqual(before13);

    // Deleting s2 hides its layer too; compaction merges both away, and the record must follow.
    await store.deleteSnapshot(s2.id);
    const report = await store.compact();
    expect(report.merged).toBeGreaterThanOrEqual(1);
    expect(await deltaBlocks(store, s1.id, s3.id)).toEqual(before13);
    expect(await deltaBlocks(store, s2.id, s3.id)).toEqual([5]);

    await store.close();
    const again = open({}, dir).store;
    expect(await deltaBlocks(again, s1.id, s3.id)).toEqual(before13);
    expect(await deltaBlocks(again, s2.id, s3.id)).toEqual([5]);
    // A snapshot taken later still counts from the deleted base.
    writeBlocks(again, v.id, [7], 4);
    const s4 = await again.createSnapshot({ volumeId: v.id });
    expect(await deltaBlocks(again, s1.id, s4.id)).toEqual([2, 3, 5, 7, 10]);
    await again.close();
  });

  it('stay exact when the deleted layer was merged into the live head, which then takes writes, through a restart', async () => {
    const { store, dir } = open();
    const v = await store.createVolume({ capacityBytes: 64 * B });
    writeBlocks(store, v.id, [0, 1], 1);
    const s0 = await store.createSnapshot({ volumeId: v.id });
    writeBlocks(store, v.id, [4, 5], 2);
    const s1 = await store.createSnapshot({ volumeId: v.id });
    writeBlocks(store, v.id, [6], 3);
    // s1's layer sits right under the live head: compaction merges it into the head.
    await store.deleteSnapshot(s1.id);
    expect((await store.compact()).merged).toBe(1);
    expect(await deltaBlocks(store, s0.id, (await store.createSnapshot({ volumeId: v.id, name: 'probe' })).id)).toEqual(
      [4, 5, 6],
    );
    await store.deleteSnapshot(store.findSnapshotByName('probe')!.id);
    await store.compact();
    // Now the head holds blocks brought in from below (4, 5 from s1; 6 its own): a rewrite of a brought-in
    // block after s1 is a change; the brought-in blocks themselves are not.
    writeBlocks(store, v.id, [4], 4);
    writeBlocks(store, v.id, [9], 5);
    await store.flush(v.id);
    await store.close();
    const again = open({}, dir).store;
    const s2 = await again.createSnapshot({ volumeId: v.id });
    expect(await deltaBlocks(again, s1.id, s2.id)).toEqual([4, 6, 9]);
    expect(await deltaBlocks(again, s0.id, s2.id)).toEqual([4, 5, 6, 9]);
    await again.close();
  });

  it('stay exact when an older deleted layer is merged into a layer that already anchors a record', async () => {
    const { store } = open();
    const v = await store.createVolume({ capacityBytes: 64 * B });
    writeBlocks(store, v.id, [0, 1], 1);
    const s0 = await store.createSnapshot({ volumeId: v.id });
    const s1 = await store.createSnapshot({ volumeId: v.id });
    writeBlocks(store, v.id, [7], 2);
    const s2 = await store.createSnapshot({ volumeId: v.id });
    // s1's record moves up to s2's layer; then s0's layer (blocks 0, 1: older than s1) merges into it too.
    await store.deleteSnapshot(s1.id);
    expect((await store.compact()).merged).toBe(1);
    await store.deleteSnapshot(s0.id);
    expect((await store.compact()).merged).toBe(1);
    expect(await deltaBlocks(store, s1.id, s2.id)).toEqual([7]);
    expect(await deltaBlocks(store, s0.id, s2.id)).toEqual([7]);
    await store.close();
  });

  it('count a rewrite of a block the merge brought into the live head as a change, even when kill -9 came before any flush', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cbt-tomb-'));
    dirs.push(dir);
    const child = spawnSync(
      process.execPath,
      ['--import', TSX_LOADER, path.join(REPO_ROOT, 'test/engine/support/rewrite-then-kill.ts'), dir],
      { encoding: 'utf8' },
    );
    expect(child.signal, child.stderr).toBe('SIGKILL');
    const { volumeId, deletedId } = JSON.parse(child.stdout.split('\n')[0]!) as { volumeId: string; deletedId: string };
    const { store } = open({}, dir);
    const now = await store.createSnapshot({ volumeId });
    // The rewrite reached the file in place (the page cache survives kill -9), so block 0 changed since the
    // deleted snapshot: a delta from it that left block 0 out would make an incremental backup miss it.
    expect(store.readSnapshot(now.id, 0, 1)[0]).toBe(9);
    expect(await deltaBlocks(store, deletedId, now.id)).toEqual([0]);
    await store.close();
  });

  it('answers HistoryGoneError once more deleted snapshots of the volume exist than retention keeps', async () => {
    const { store } = open({ deletedSnapshotRetention: { maxPerVolume: 2 } });
    const v = await store.createVolume({ capacityBytes: 64 * B });
    const snaps: Array<{ id: string }> = [];
    for (let i = 0; i < 4; i++) {
      writeBlocks(store, v.id, [i], i + 1);
      snaps.push(await store.createSnapshot({ volumeId: v.id }));
    }
    const last = await store.createSnapshot({ volumeId: v.id });
    for (const s of snaps) await store.deleteSnapshot(s.id);
    await store.compact();
    // The two oldest expired; the two newest still answer exactly.
    expect(() => store.delta(snaps[0]!.id, last.id)).toThrow(HistoryGoneError);
    expect(() => store.delta(snaps[1]!.id, last.id)).toThrow(/take a full backup/);
    expect(await deltaBlocks(store, snaps[2]!.id, last.id)).toEqual([3]);
    expect(await deltaBlocks(store, snaps[3]!.id, last.id)).toEqual([]);
    await store.close();
  });

  it('answers HistoryGoneError once a deleted snapshot is older than the retention age', async () => {
    const { store } = open({ deletedSnapshotRetention: { maxAgeMs: 50 } });
    const v = await store.createVolume({ capacityBytes: 64 * B });
    const s1 = await store.createSnapshot({ volumeId: v.id });
    writeBlocks(store, v.id, [1], 1);
    const s2 = await store.createSnapshot({ volumeId: v.id });
    await store.deleteSnapshot(s1.id);
    expect(await deltaBlocks(store, s1.id, s2.id)).toEqual([1]);
    await new Promise((r) => setTimeout(r, 80));
    expect(() => store.delta(s1.id, s2.id)).toThrow(HistoryGoneError);
    await store.close();
  });

  it('forgets the record once nothing can be a later target (volume and snapshots gone, layers dropped)', async () => {
    const { store, dir } = open();
    const v = await store.createVolume({ capacityBytes: 64 * B });
    const s1 = await store.createSnapshot({ volumeId: v.id });
    await store.deleteSnapshot(s1.id);
    await store.deleteVolume(v.id);
    await store.compact();
    expect(store.spaceUsage().layers).toBe(0);
    await store.close();
    const again = open({}, dir).store;
    const w = await again.createVolume({ capacityBytes: 64 * B });
    const t = await again.createSnapshot({ volumeId: w.id });
    expect(() => again.delta(s1.id, t.id)).toThrow(NotFoundError);
    await again.close();
  });

  it('is still refused for a deleted base of another volume', async () => {
    const { store } = open();
    const a = await store.createVolume({ capacityBytes: 64 * B });
    const b = await store.createVolume({ capacityBytes: 64 * B });
    const sa = await store.createSnapshot({ volumeId: a.id });
    await store.createSnapshot({ volumeId: a.id });
    const sb = await store.createSnapshot({ volumeId: b.id });
    await store.deleteSnapshot(sa.id);
    expect(() => store.delta(sa.id, sb.id)).toThrow(/do not share a history/);
    await store.close();
  });
});
