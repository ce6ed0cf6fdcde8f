/**
 * `cbt-csi metadata … | head -1`: the reader of stdout goes away long before the listing ends. Like other
 * Unix tools the command then stops quietly with exit 0, without a stack trace or an EPIPE message.
 */
import { spawn } from 'node:child_process';
import path from 'node:path';
import { afterAll, beforeAll, expect, test } from 'vitest';
import { REPO_ROOT, TSX_LOADER, startTestDriver, type TestDriver } from '../support/test-driver.js';

const KiB = 1024;
const MiB = 1024 * KiB;
/** Every other 4 KiB block of 64 MiB: 8192 extents, far more output than a pipe buffers. */
const CAPACITY = 64 * MiB;

let t: TestDriver;
let snapshotId = '';
let baseId = '';

beforeAll(async () => {
  t = await startTestDriver();
  const volume = await t.controller.call('createVolume', {
    name: 'closed-stdout',
    capacityRange: { requiredBytes: BigInt(CAPACITY) },
    volumeCapabilities: [{ accessMode: { mode: 1 }, accessType: { case: 'block' as const, value: {} } }],
  });
  const volumeId = volume.volume!.volumeId;
  baseId = (await t.controller.call('createSnapshot', { name: 'base', sourceVolumeId: volumeId })).snapshot!.snapshotId;
  for (let offset = 0; offset < CAPACITY; offset += 8 * KiB)
    t.driver.store.write(volumeId, offset, Buffer.alloc(4 * KiB, 1));
  snapshotId = (await t.controller.call('createSnapshot', { name: 'snap', sourceVolumeId: volumeId })).snapshot!
    .snapshotId;
});

afterAll(async () => {
  await t?.stop();
});

/** Runs `cbt-csi ARGS | head -1` in bash; returns what head printed, and cbt-csi's exit status and stderr. */
function pipedToHead(args: string[]): Promise<{ head: string; status: number; stderr: string }> {
  const script = '"$@" 2>"$ERR_FILE" | head -1; echo "$PIPESTATUS" >"$STATUS_FILE"';
  const errFile = path.join(t.dir, `stderr-${args[1]}`);
  const statusFile = path.join(t.dir, `status-${args[1]}`);
  const child = spawn(
    'bash',
    ['-c', script, 'bash', process.execPath, '--import', TSX_LOADER, path.join(REPO_ROOT, 'src/cli.ts'), ...args],
    {
      cwd: REPO_ROOT,
      env: { ...process.env, ERR_FILE: errFile, STATUS_FILE: statusFile },
      stdio: ['ignore', 'pipe', 'inherit'],
    },
  );
  let head = '';
  child.stdout.on('data', (d: Buffer) => (head += d.toString()));
  return new Promise((resolve, reject) => {
    child.once('error', reject);
    child.once('close', async () => {
      const fs = await import('node:fs');
      resolve({
        head,
        status: Number(fs.readFileSync(statusFile, 'utf8').trim()),
        stderr: fs.readFileSync(errFile, 'utf8'),
      });
    });
  });
}

for (const [command, ids, first] of [
  ['allocated', () => [snapshotId], /^capacity 67108864 bytes/],
  ['delta', () => [baseId, snapshotId], /^offset,length\n$/],
] as const) {
  test(`metadata ${command} | head -1: exit 0, nothing on stderr`, async () => {
    const format = command === 'delta' ? ['--format', 'csv'] : [];
    const r = await pipedToHead(['metadata', command, ...ids(), '--endpoint', t.target, ...format]);
    expect(r.head).toMatch(first);
    expect(r.stderr).toBe('');
    expect(r.status).toBe(0);
  }, 60_000);
}
