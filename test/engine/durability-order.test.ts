/**
 * Invariant 3, the half a kill -9 cannot see (the page cache survives it): a layer's data is made durable
 * (fdatasync) before the catalog commit that makes its bits visible, for flushes, snapshots and merges.
 * The test records the order of the two calls as they happen.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { Catalog } from '../../storage-engine/catalog.js';
import { BlockStore } from '../../storage-engine/index.js';
import { Layer } from '../../storage-engine/layer.js';

const events: string[] = [];
const dirs: string[] = [];
/** Runs once, inside the next asynchronous fdatasync: a way to land a write while a sync is in flight. */
let duringNextSync: (() => void) | undefined;

function record(): void {
  const fdatasync = fs.fdatasync;
  vi.spyOn(fs, 'fdatasync').mockImplementation(((fd: number, cb: (err: NodeJS.ErrnoException | null) => void) => {
    events.push('sync');
    const hook = duringNextSync;
    duringNextSync = undefined;
    return fdatasync(fd, (err) => {
      hook?.();
      cb(err);
    });
  }) as typeof fs.fdatasync);
  const fdatasyncSync = fs.fdatasyncSync;
  vi.spyOn(fs, 'fdatasyncSync').mockImplementation((fd: number) => {
    events.push('sync');
    return fdatasyncSync(fd);
  });
  const writeAt = Layer.prototype.writeAt;
  vi.spyOn(Layer.prototype, 'writeAt').mockImplementation(function (this: Layer, data: Uint8Array, position: number) {
    events.push('write');
    return writeAt.call(this, data, position);
  });
  for (const method of ['appendJournal', 'freezeLayer'] as const) {
    const original = Catalog.prototype[method];
    vi.spyOn(Catalog.prototype, method).mockImplementation(function (
      this: Catalog,
      ...args: Parameters<typeof original>
    ) {
      events.push(method);
      return (original as (...a: typeof args) => void).apply(this, args);
    });
  }
}

function open(): BlockStore {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cbt-order-'));
  dirs.push(dir);
  return BlockStore.open(dir, { autoCompact: false });
}

afterEach(() => {
  vi.restoreAllMocks();
  events.length = 0;
  duringNextSync = undefined;
  for (const d of dirs.splice(0)) fs.rmSync(d, { recursive: true, force: true });
});

/** Every catalog commit of bits comes after a data sync that started after the last write before it. */
function expectSyncBeforeEachCommit(): void {
  let unsynced = false;
  for (const e of events) {
    if (e === 'write') unsynced = true;
    else if (e === 'sync') unsynced = false;
    else
      expect(unsynced, `${e} committed bits of data written after the last fdatasync: ${events.join(' ')}`).toBe(false);
  }
  expect(events.some((e) => e === 'appendJournal' || e === 'freezeLayer')).toBe(true);
}

describe('durability order (invariant 3)', () => {
  it('flush: the head file is synced before the journal entry naming its new blocks is committed', async () => {
    const store = open();
    const v = await store.createVolume({ capacityBytes: 1 << 20 });
    record();
    store.write(v.id, 0, Buffer.alloc(8192, 1));
    await store.flush(v.id);
    store.trim(v.id, 0, 4096);
    await store.flush(v.id);
    expectSyncBeforeEachCommit();
    expect(events.filter((e) => e === 'appendJournal')).toHaveLength(2);
    await store.close();
  });

  it('snapshot: the head file is synced before the freeze that stores its bitmaps', async () => {
    const store = open();
    const v = await store.createVolume({ capacityBytes: 1 << 20 });
    record();
    store.write(v.id, 4096, Buffer.alloc(4096, 2));
    // A write that lands while the snapshot awaits its sync must be synced again before the freeze.
    duringNextSync = () => store.write(v.id, 8192, Buffer.alloc(4096, 3));
    const snap = await store.createSnapshot({ volumeId: v.id });
    expect(duringNextSync).toBeUndefined();
    expectSyncBeforeEachCommit();
    expect(events).toContain('freezeLayer');
    expect(store.readSnapshot(snap.id, 8192, 1)[0]).toBe(3);
    await store.close();
  });

  it('compaction: data copied into the layer above is synced before the bits naming it are committed', async () => {
    const store = open();
    const v = await store.createVolume({ capacityBytes: 1 << 20 });
    store.write(v.id, 0, Buffer.alloc(16384, 4));
    const s1 = await store.createSnapshot({ volumeId: v.id });
    store.write(v.id, 65536, Buffer.alloc(4096, 5));
    await store.createSnapshot({ volumeId: v.id });
    await store.deleteSnapshot(s1.id);
    record();
    const report = await store.compact();
    expect(report.merged).toBe(1);
    expectSyncBeforeEachCommit();
    await store.close();
  });
});
