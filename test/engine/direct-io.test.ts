/**
 * Direct I/O sessions (storage-engine/direct-io.ts): a host writes whole blocks into a volume's head file
 * itself and records them later. The engine must call the host back so that its rules hold: completed
 * direct writes are recorded before a flush commits (invariant 3) and before the engine reads or changes
 * the volume, the session ends before the head is frozen or merged into, and the host hears of every
 * change the engine makes itself.
 */
import fs from 'node:fs';
import { describe, expect, test } from 'vitest';
import type { BlockStore } from '../../storage-engine/index.js';
import type { ChangedBlocks, DirectIoHost, DirectIoSession, DirectIoView } from '../../storage-engine/direct-io.js';
import { collect, pattern, useTempStores } from './support/example-support.js';

const stores = useTempStores();
const B = 4096;

/** A host that writes into the head file like the data plane's I/O threads do, and records on request. */
class TestHost implements DirectIoHost {
  session!: DirectIoSession;
  view!: DirectIoView;
  readonly calls: string[] = [];
  readonly changes: Array<[first: number, end: number, toHead: boolean]> = [];
  /** Completed direct writes not recorded yet. */
  private pending: Array<[number, number]> = [];
  private fd: number | undefined;

  static open(store: BlockStore, volumeId: string): TestHost {
    const host = new TestHost();
    const session = store.openDirectIo(volumeId, host);
    if (!session) throw new Error('no session');
    host.session = session;
    host.view = session.view();
    return host;
  }

  /** Writes whole blocks at `block` into the head's file, as a direct write does, without recording them. */
  write(block: number, data: Buffer): void {
    if (!this.session.open) throw new Error('session is over');
    this.fd ??= fs.openSync(this.view.head.path, 'r+');
    fs.writeSync(this.fd, data, 0, data.length, block * B);
    this.pending.push([block, block + data.length / B]);
  }

  drain(): void {
    this.calls.push('drain');
    this.recordPending();
  }

  revoke(): void {
    this.calls.push('revoke');
    this.recordPending();
    if (this.fd !== undefined) fs.closeSync(this.fd);
    this.fd = undefined;
  }

  exclusive(change: () => void, changed: readonly ChangedBlocks[]): void {
    this.calls.push('exclusive');
    this.recordPending();
    try {
      change();
    } catch (err) {
      this.session.close();
      throw err;
    }
    for (const c of changed) this.changes.push([...c]);
  }

  private recordPending(): void {
    for (const [first, end] of this.pending.splice(0)) this.session.recordWritten(first, end);
  }
}

async function volume(store: BlockStore, blocks = 64): Promise<string> {
  return (await store.createVolume({ name: 'v', capacityBytes: blocks * B, blockSize: B })).id;
}

describe('direct I/O sessions', () => {
  test('the view is the chain as it reads: runs per owning layer, the head and every named file', async () => {
    const { store } = stores.open({ autoCompact: false });
    const id = await volume(store);
    store.write(id, 0, pattern(1, 4 * B));
    await store.createSnapshot({ volumeId: id, name: 's1' });
    store.write(id, 2 * B, pattern(2, 4 * B));
    const host = TestHost.open(store, id);
    const v = host.view;
    expect(v.blockSize).toBe(B);
    expect(v.capacityBytes).toBe(64 * B);
    expect([...v.starts]).toEqual([0, 2]);
    expect([...v.ends]).toEqual([2, 6]);
    expect(v.owners[1]).toBe(v.head.id);
    expect(v.owners[0]).not.toBe(v.head.id);
    for (const owner of v.owners) expect(fs.existsSync(v.layerPaths.get(owner)!)).toBe(true);
    expect(v.layerPaths.get(v.head.id)).toBe(v.head.path);
  });

  test('recorded direct writes read back through the engine and are in the next delta', async () => {
    const { store } = stores.open({ autoCompact: false });
    const id = await volume(store);
    const s1 = await store.createSnapshot({ volumeId: id, name: 's1' });
    const host = TestHost.open(store, id);
    host.write(5, pattern(3, 2 * B));
    // An engine read of the volume records the completed direct write first.
    expect(store.read(id, 5 * B, 2 * B).equals(pattern(3, 2 * B))).toBe(true);
    expect(host.calls).toEqual(['drain']);
    const s2 = await store.createSnapshot({ volumeId: id, name: 's2' });
    expect(await collect(store.delta(s1.id, s2.id))).toEqual([{ offset: 5 * B, length: 2 * B }]);
  });

  test('a flush records completed direct writes before it commits: they survive a reopen (invariant 3)', async () => {
    const { store, dir } = stores.open({ autoCompact: false });
    const id = await volume(store);
    const host = TestHost.open(store, id);
    host.write(7, pattern(4, B));
    await store.flush(id);
    expect(host.calls).toEqual(['drain']);
    await store.close();
    const reopened = stores.reopen(dir, { autoCompact: false });
    expect(reopened.read(id, 7 * B, B).equals(pattern(4, B))).toBe(true);
  });

  test('a snapshot ends the session before it freezes the head, and keeps every write recorded then', async () => {
    const { store } = stores.open({ autoCompact: false });
    const id = await volume(store);
    const host = TestHost.open(store, id);
    host.write(1, pattern(5, B));
    const snap = await store.createSnapshot({ volumeId: id, name: 's' });
    expect(host.calls).toContain('revoke');
    expect(host.session.open).toBe(false);
    expect(() => host.write(2, pattern(6, B))).toThrow(/over/);
    expect(store.readSnapshot(snap.id, B, B).equals(pattern(5, B))).toBe(true);
    // A new session starts on the new head, which is empty; the old one's view named the frozen layer.
    const next = TestHost.open(store, id);
    expect(next.view.head.id).not.toBe(host.view.head.id);
    next.write(2, pattern(6, B));
    expect(store.read(id, B, 2 * B).equals(Buffer.concat([pattern(5, B), pattern(6, B)]))).toBe(true);
    expect(store.readSnapshot(snap.id, 2 * B, B).equals(Buffer.alloc(B))).toBe(true);
  });

  test('a clone of the volume ends the session first and contains its recorded writes', async () => {
    const { store } = stores.open({ autoCompact: false });
    const id = await volume(store);
    const host = TestHost.open(store, id);
    host.write(3, pattern(7, B));
    const clone = await store.createVolume({
      name: 'c',
      capacityBytes: 64 * B,
      sourceVolumeId: id,
    });
    expect(host.calls).toContain('revoke');
    expect(host.session.open).toBe(false);
    expect(store.read(clone.id, 3 * B, B).equals(pattern(7, B))).toBe(true);
  });

  test("the engine makes its own writes and trims inside the host's exclusive section and says which blocks changed", async () => {
    const { store } = stores.open({ autoCompact: false });
    const id = await volume(store);
    const host = TestHost.open(store, id);
    store.write(id, 3 * B + 100, Buffer.alloc(B, 1));
    store.trim(id, 10 * B + 1, 3 * B);
    store.trim(id, 20 * B + 8, 16);
    expect(host.changes).toEqual([
      [3, 5, true],
      [10, 11, true],
      [11, 13, false],
      [13, 14, true],
      [20, 21, true],
    ]);
    expect(host.calls).toEqual(['exclusive', 'exclusive', 'exclusive']);
  });

  test('a merge into the live head ends the session and refuses a new one until the merge committed', async () => {
    const { store } = stores.open({ autoCompact: false });
    const id = await volume(store);
    store.write(id, 0, pattern(8, 8 * B));
    const s1 = await store.createSnapshot({ volumeId: id, name: 's1' });
    const host = TestHost.open(store, id);
    host.write(4, pattern(9, B));
    await store.deleteSnapshot(s1.id);
    let duringMerge: DirectIoSession | undefined | 'not asked' = 'not asked';
    const origRevoke = host.revoke.bind(host);
    host.revoke = () => {
      origRevoke();
      // Asked from inside the merge, after the session ended: the volume has no session to give.
      queueMicrotask(() => {
        duringMerge = store.openDirectIo(id, new TestHost());
      });
    };
    await store.compact();
    expect(host.calls).toContain('revoke');
    expect(duringMerge).toBeUndefined();
    // The merge kept the recorded direct write over the merged-in block.
    expect(
      store
        .read(id, 0, 8 * B)
        .equals(
          Buffer.concat([pattern(8, 8 * B).subarray(0, 4 * B), pattern(9, B), pattern(8, 8 * B).subarray(5 * B)]),
        ),
    ).toBe(true);
    expect(TestHost.open(store, id).session.open).toBe(true);
  });

  test("blocks a change record excludes at the head are named in the view: their writes are the engine's (invariant 8)", async () => {
    const { store } = stores.open({ autoCompact: false });
    const id = await volume(store);
    const base = await store.createSnapshot({ volumeId: id, name: 'base' });
    store.write(id, 2 * B, pattern(13, 3 * B));
    const s1 = await store.createSnapshot({ volumeId: id, name: 's1' });
    store.write(id, 3 * B, pattern(14, B));
    await store.deleteSnapshot(s1.id);
    // s1's layer merges into the live head: blocks 2 and 4 come in unchanged since s1 and are excluded.
    await store.compact();
    const host = TestHost.open(store, id);
    expect([...host.view.engineWriteStarts]).toEqual([2, 4]);
    expect([...host.view.engineWriteEnds]).toEqual([3, 5]);
    // An engine write of one of them takes it off the record's exclusions; a new view has it no more.
    store.write(id, 2 * B, pattern(15, B));
    host.session.close();
    const next = TestHost.open(store, id);
    expect([...next.view.engineWriteStarts]).toEqual([4]);
    expect(await collect(store.delta(base.id, (await store.createSnapshot({ volumeId: id, name: 's2' })).id))).toEqual([
      { offset: 2 * B, length: 3 * B },
    ]);
  });

  test('a merge of a layer the view names into a frozen layer ends the session (the file goes away)', async () => {
    const { store } = stores.open({ autoCompact: false });
    const id = await volume(store);
    store.write(id, 0, pattern(10, 2 * B));
    const s1 = await store.createSnapshot({ volumeId: id, name: 's1' });
    store.write(id, 4 * B, pattern(11, B));
    await store.createSnapshot({ volumeId: id, name: 's2' });
    const host = TestHost.open(store, id);
    await store.deleteSnapshot(s1.id);
    await store.compact();
    expect(host.calls).toEqual(['revoke']);
    expect(host.session.open).toBe(false);
    const again = TestHost.open(store, id);
    expect(new Set(again.view.owners).size).toBe(1);
  });

  test('one session a volume; closing it lets another open; close of the store ends it', async () => {
    const { store } = stores.open({ autoCompact: false });
    const id = await volume(store);
    const host = TestHost.open(store, id);
    expect(() => store.openDirectIo(id, new TestHost())).toThrow(/already/);
    host.session.close();
    const next = TestHost.open(store, id);
    next.write(0, pattern(12, B));
    await store.close();
    expect(next.calls).toEqual(['revoke']);
  });

  test('an engine write that fails inside the exclusive section ends the session', async () => {
    const { store } = stores.open({ autoCompact: false });
    const id = await volume(store);
    const host = TestHost.open(store, id);
    expect(() => store.write(id, 0, 'not bytes' as unknown as Uint8Array)).toThrow();
    // Validation fails before the section: the session goes on.
    expect(host.session.open).toBe(true);
    const failing = host.exclusive.bind(host);
    host.exclusive = (_change, changed) =>
      failing(() => {
        throw new Error('disk gone');
      }, changed);
    expect(() => store.write(id, 0, Buffer.alloc(B))).toThrow('disk gone');
    expect(host.session.open).toBe(false);
    expect(TestHost.open(store, id).session.open).toBe(true);
  });

  test('recordWritten refuses blocks outside the volume', async () => {
    const { store } = stores.open({ autoCompact: false });
    const id = await volume(store, 8);
    const host = TestHost.open(store, id);
    expect(() => host.session.recordWritten(7, 9)).toThrow(RangeError);
    expect(() => host.session.recordWritten(3, 3)).toThrow(RangeError);
    expect(() => host.session.recordWritten(-1, 1)).toThrow(RangeError);
  });
});
