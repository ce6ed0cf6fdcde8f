/**
 * One process owns a store directory at a time: a second process is refused while the owner lives, and
 * a killed owner's claim is stale and taken over.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { BlockStore, BusyError } from '../../storage-engine/index.js';
import { REPO_ROOT, TSX_LOADER as TSX } from '../support/test-driver.js';

const children: ChildProcess[] = [];
const dirs: string[] = [];

afterEach(() => {
  for (const c of children.splice(0)) c.kill('SIGKILL');
  for (const d of dirs.splice(0)) fs.rmSync(d, { recursive: true, force: true });
});

async function holdInChild(dir: string): Promise<ChildProcess> {
  const child = spawn(process.execPath, ['--import', TSX, path.join(REPO_ROOT, 'test/engine/support/hold-store.ts'), dir], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  children.push(child);
  let err = '';
  child.stderr!.on('data', (b: Buffer) => (err += b.toString()));
  await new Promise<void>((resolve, reject) => {
    child.stdout!.on('data', (b: Buffer) => b.toString().includes('ready') && resolve());
    child.once('exit', (code) => reject(new Error(`holder exited with ${code}: ${err}`)));
  });
  return child;
}

describe('store ownership', () => {
  it('a store open in another live process is refused with BusyError, and nothing in it changes', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cbt-owner-'));
    dirs.push(dir);
    const child = await holdInChild(dir);
    const before = fs.readdirSync(path.join(dir, 'layers')).sort();
    let caught: unknown;
    try {
      BlockStore.open(dir);
    } catch (err) {
      caught = err;
    }
    expect(caught).toBeInstanceOf(BusyError);
    expect((caught as BusyError).message).toContain(String(child.pid));
    expect(fs.readdirSync(path.join(dir, 'layers')).sort()).toEqual(before);
  });

  it('the claim of an owner killed with SIGKILL is stale: the next open takes the store over and sees its data', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cbt-owner-'));
    dirs.push(dir);
    const child = await holdInChild(dir);
    child.kill('SIGKILL');
    await new Promise((resolve) => child.once('exit', resolve));
    const store = BlockStore.open(dir);
    try {
      expect(store.findVolumeByName('held')).toBeDefined();
    } finally {
      await store.close();
    }
    expect(fs.existsSync(path.join(dir, 'owner.pid'))).toBe(false);
  });
});
