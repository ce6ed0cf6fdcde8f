/**
 * Invariant 7, the part the engine owns: the store's directories are 0700 and its files (layers, catalog and
 * the catalog's WAL and shared-memory files) 0600 whatever the process umask, after every kind of change and
 * after a restart; a store left readable by an earlier version is made private when it opens.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { BlockStore } from '../../storage-engine/index.js';

const dirs: string[] = [];
const savedUmask = process.umask();

afterEach(() => {
  process.umask(savedUmask);
  for (const d of dirs.splice(0)) fs.rmSync(d, { recursive: true, force: true });
});

/** Every directory and file under the store with its permission bits. */
function modes(storeDir: string): Array<{ file: string; mode: number; dir: boolean }> {
  const out: Array<{ file: string; mode: number; dir: boolean }> = [];
  const walk = (p: string): void => {
    const st = fs.lstatSync(p);
    out.push({ file: path.relative(storeDir, p) || '.', mode: st.mode & 0o777, dir: st.isDirectory() });
    if (st.isDirectory()) for (const e of fs.readdirSync(p)) walk(path.join(p, e));
  };
  walk(storeDir);
  return out;
}

function expectPrivate(storeDir: string, when: string): void {
  const all = modes(storeDir);
  for (const { file, mode, dir } of all) {
    expect(mode.toString(8), `${file} ${when}`).toBe(dir ? '700' : '600');
  }
  expect(all.some((m) => m.file.startsWith('layers/'))).toBe(true);
  expect(all.some((m) => m.file === 'catalog.db')).toBe(true);
}

describe('store file modes (invariant 7)', () => {
  for (const umask of [0o022, 0o000]) {
    it(`are 0700 for directories and 0600 for files under umask ${umask.toString(8).padStart(3, '0')}, through every change and a restart`, async () => {
      process.umask(umask);
      const parent = fs.mkdtempSync(path.join(os.tmpdir(), 'cbt-modes-'));
      dirs.push(parent);
      const dir = path.join(parent, 'store');
      let store = BlockStore.open(dir, { autoCompact: false });
      const v = await store.createVolume({ capacityBytes: 1 << 20 });
      store.write(v.id, 0, Buffer.alloc(8192, 1));
      await store.flush(v.id);
      expectPrivate(dir, 'after create and flush');
      const s1 = await store.createSnapshot({ volumeId: v.id });
      store.write(v.id, 0, Buffer.alloc(4096, 2));
      await store.createSnapshot({ volumeId: v.id });
      expectPrivate(dir, 'after snapshots');
      await store.createVolume({ capacityBytes: 1 << 20, sourceSnapshotId: s1.id });
      await store.createVolume({ capacityBytes: 1 << 20, sourceVolumeId: v.id });
      expectPrivate(dir, 'after clones');
      await store.deleteSnapshot(s1.id);
      expect((await store.compact()).merged + (await store.compact()).dropped).toBeGreaterThanOrEqual(0);
      expectPrivate(dir, 'after compaction');
      await store.close();
      store = BlockStore.open(dir, { autoCompact: false });
      expect(store.read(v.id, 0, 1)[0]).toBe(2);
      expectPrivate(dir, 'after restart');
      await store.close();
    });
  }

  it('makes a store with readable files (an earlier version, a careless copy) private when it opens', async () => {
    const parent = fs.mkdtempSync(path.join(os.tmpdir(), 'cbt-modes-'));
    dirs.push(parent);
    const dir = path.join(parent, 'store');
    let store = BlockStore.open(dir, { autoCompact: false });
    const v = await store.createVolume({ capacityBytes: 1 << 20 });
    store.write(v.id, 0, Buffer.alloc(4096, 7));
    await store.createSnapshot({ volumeId: v.id });
    await store.close();
    for (const { file, dir: isDir } of modes(dir)) fs.chmodSync(path.join(dir, file), isDir ? 0o755 : 0o644);
    store = BlockStore.open(dir, { autoCompact: false });
    expectPrivate(dir, 'after reopening a readable store');
    await store.close();
  });
});
