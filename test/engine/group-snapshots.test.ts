/**
 * Invariant 9: a group snapshot freezes all member heads in one catalog transaction, so it is one point in
 * time for all of them; its members are ordinary snapshots for reads, clones and deltas, deleted with the
 * group and not alone; groups are idempotent by name and survive a restart.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import {
  AlreadyExistsError,
  BlockStore,
  BusyError,
  InvalidArgumentError,
  NotFoundError,
} from '../../storage-engine/index.js';

const B = 4096;
const dirs: string[] = [];
afterEach(() => {
  for (const d of dirs.splice(0)) fs.rmSync(d, { recursive: true, force: true });
});

function openStore(dir?: string): { store: BlockStore; dir: string } {
  const d = dir ?? fs.mkdtempSync(path.join(os.tmpdir(), 'cbt-group-'));
  if (!dir) dirs.push(d);
  return { store: BlockStore.open(d, { autoCompact: false }), dir: d };
}

const roundOf = (buf: Buffer): number => buf.readUInt32LE(0);

describe('group snapshots (invariant 9)', () => {
  it('see one point in time on every member while writes race them', async () => {
    const { store } = openStore();
    const vols = await Promise.all([0, 1, 2].map(() => store.createVolume({ capacityBytes: 64 * B })));
    // Each round writes its number to block 0 of every volume in one synchronous step, again and again
    // while the group snapshot syncs and freezes.
    let round = 0;
    let running = true;
    const writer = (async () => {
      while (running) {
        round++;
        const data = Buffer.alloc(B);
        data.writeUInt32LE(round, 0);
        for (const v of vols) store.write(v.id, 0, data);
        await new Promise((r) => setImmediate(r));
      }
    })();
    const groups = [];
    for (let i = 0; i < 20; i++) {
      // Let the writer run between groups (a group of clean heads needs no I/O and would not yield).
      await new Promise((r) => setTimeout(r, 2));
      groups.push(await store.createGroupSnapshot({ members: vols.map((v) => ({ volumeId: v.id })) }));
    }
    running = false;
    await writer;
    for (const g of groups) {
      const rounds = g.snapshots.map((s) => roundOf(store.readSnapshot(s.id, 0, B)));
      expect(new Set(rounds).size, `members of ${g.id} saw rounds ${rounds.join(', ')}`).toBe(1);
    }
    // The writer really raced: the groups saw different rounds.
    expect(new Set(groups.map((g) => roundOf(store.readSnapshot(g.snapshots[0]!.id, 0, B)))).size).toBeGreaterThan(1);
    await store.close();
  });

  it('are idempotent by name, and refuse a reused name for other volumes, duplicates, no volumes and unknown volumes', async () => {
    const { store } = openStore();
    const [a, b, c] = await Promise.all([0, 1, 2].map(() => store.createVolume({ capacityBytes: 16 * B })));
    const g = await store.createGroupSnapshot({ name: 'g', members: [{ volumeId: a!.id }, { volumeId: b!.id }] });
    const again = await store.createGroupSnapshot({ name: 'g', members: [{ volumeId: b!.id }, { volumeId: a!.id }] });
    expect(again).toEqual(g);
    await expect(
      store.createGroupSnapshot({ name: 'g', members: [{ volumeId: a!.id }, { volumeId: c!.id }] }),
    ).rejects.toThrow(AlreadyExistsError);
    await expect(store.createGroupSnapshot({ members: [{ volumeId: a!.id }, { volumeId: a!.id }] })).rejects.toThrow(
      InvalidArgumentError,
    );
    await expect(store.createGroupSnapshot({ members: [] })).rejects.toThrow(InvalidArgumentError);
    const before = store.listSnapshots().length;
    await expect(
      store.createGroupSnapshot({ members: [{ volumeId: a!.id }, { volumeId: 'vol-0000000000000000' }] }),
    ).rejects.toThrow(NotFoundError);
    expect(store.listSnapshots()).toHaveLength(before);
    expect(store.listGroupSnapshots()).toHaveLength(1);
    await store.close();
  });

  it('have ordinary member snapshots: readable, restorable, deltas between groups; deleted with the group only', async () => {
    const { store, dir } = openStore();
    const [a, b] = await Promise.all([0, 1].map(() => store.createVolume({ capacityBytes: 16 * B })));
    store.write(a!.id, 0, Buffer.alloc(B, 1));
    store.write(b!.id, B, Buffer.alloc(B, 2));
    const g1 = await store.createGroupSnapshot({
      name: 'g1',
      members: [{ volumeId: a!.id }, { volumeId: b!.id, attributes: { k: 'v' } }],
    });
    store.write(a!.id, 3 * B, Buffer.alloc(B, 3));
    const g2 = await store.createGroupSnapshot({ name: 'g2', members: [{ volumeId: a!.id }, { volumeId: b!.id }] });
    const [a1, b1] = g1.snapshots;
    const [a2] = g2.snapshots;
    expect(b1!.attributes).toEqual({ k: 'v' });
    expect(a1!.groupId).toBe(g1.id);
    const restored = await store.createVolume({ capacityBytes: 16 * B, sourceSnapshotId: b1!.id });
    expect(store.read(restored.id, B, B)).toEqual(Buffer.alloc(B, 2));
    const changed: number[] = [];
    for await (const batch of store.delta(a1!.id, a2!.id, { style: 'FIXED' }))
      for (const e of batch) changed.push(e.offset / B);
    expect(changed).toEqual([3]);

    await expect(store.deleteSnapshot(a1!.id)).rejects.toThrow(BusyError);
    await store.close();
    const again = openStore(dir).store;
    expect(again.getGroupSnapshot(g1.id)).toEqual(g1);
    await again.deleteGroupSnapshot(g1.id);
    expect(() => again.getGroupSnapshot(g1.id)).toThrow(NotFoundError);
    expect(() => again.getSnapshot(a1!.id)).toThrow(NotFoundError);
    // The deleted members leave change records: deltas from them stay exact.
    const fromDeleted: number[] = [];
    for await (const batch of again.delta(a1!.id, a2!.id, { style: 'FIXED' }))
      for (const e of batch) fromDeleted.push(e.offset / B);
    expect(fromDeleted).toEqual([3]);
    expect(again.read(restored.id, B, B)).toEqual(Buffer.alloc(B, 2));
    await again.close();
  });
});
