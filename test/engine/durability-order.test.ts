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

describe('the spare layer file (a snapshot syncs only its catalog commit)', () => {
  /** Directory fsyncs and data syncs made by node's fs during `fn` (SQLite's own fsync is not among them). */
  async function syncsDuring(fn: () => Promise<unknown>): Promise<number> {
    let n = 0;
    const { fsyncSync, fdatasyncSync } = fs;
    const spies = [
      vi.spyOn(fs, 'fsyncSync').mockImplementation((fd: number) => {
        n++;
        fsyncSync(fd);
      }),
      vi.spyOn(fs, 'fdatasyncSync').mockImplementation((fd: number) => {
        n++;
        fdatasyncSync(fd);
      }),
    ];
    try {
      await fn();
    } finally {
      for (const s of spies) s.mockRestore();
    }
    return n;
  }

  it('CreateSnapshot of a flushed volume makes its new head from the spare: no directory or data sync', async () => {
    const store = open();
    const v = await store.createVolume({ capacityBytes: 1 << 20 });
    store.write(v.id, 0, Buffer.alloc(4096, 1));
    await store.flush(v.id);
    // compact() settles the store's background file work, the spare's making included.
    await store.compact();
    expect(await syncsDuring(() => store.createSnapshot({ volumeId: v.id }))).toBe(0);
    // The new head took the spare's file: it is there, empty, and takes writes that survive a reopen.
    store.write(v.id, 4096, Buffer.alloc(4096, 7));
    await store.flush(v.id);
    await store.close();
    const again = BlockStore.open(store.dir, { autoCompact: false });
    expect(again.read(v.id, 4096, 1)[0]).toBe(7);
    expect(again.read(v.id, 0, 1)[0]).toBe(1);
    await again.close();
  });

  it('without a ready spare (a second new layer in one transaction) the directory is synced before the commit', async () => {
    const store = open();
    const a = await store.createVolume({ capacityBytes: 1 << 20 });
    const b = await store.createVolume({ capacityBytes: 1 << 20 });
    await store.compact();
    // A group of two takes two new heads: the spare covers one, the other syncs the directory itself.
    expect(
      await syncsDuring(() =>
        store.createGroupSnapshot({ name: 'g', members: [{ volumeId: a.id }, { volumeId: b.id }] }),
      ),
    ).toBe(1);
    await store.close();
  });

  it('a closed store holds no spare; a killed one leaves it to the next open, which removes it', async () => {
    const store = open();
    await store.createVolume({ capacityBytes: 1 << 20 });
    await store.compact();
    const layerFiles = () => fs.readdirSync(path.join(store.dir, 'layers')).sort();
    const withSpare = layerFiles();
    await store.close();
    expect(layerFiles()).toHaveLength(withSpare.length - 1);
    // As after kill -9: an empty file for an id the catalog never handed out.
    const next = Math.max(...withSpare.map((f) => Number.parseInt(f, 10)));
    fs.writeFileSync(path.join(store.dir, 'layers', `${next}.layer`), '');
    const again = BlockStore.open(store.dir, { autoCompact: false });
    await again.compact();
    await again.close();
    expect(layerFiles()).toHaveLength(withSpare.length - 1);
  });
});
