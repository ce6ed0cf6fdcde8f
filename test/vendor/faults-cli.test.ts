/**
 * The fault commands as a vendor types them: `cbt-csi serve --faults FILE --admin-endpoint PATH`, then
 * `cbt-csi faults list|add|clear`. A malformed file stops serve with the field named.
 */
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, expect, test } from 'vitest';
import { status } from '@grpc/grpc-js';
import { SnapshotMetadata } from '../../src/gen/csi/v1/csi_pb.js';
import { ServiceClient } from '../support/csi-client.js';
import { REPO_ROOT, TSX_LOADER, spawnDriver } from '../support/test-driver.js';

const run = promisify(execFile);
const cli = (args: string[]) =>
  run(process.execPath, ['--import', TSX_LOADER, path.join(REPO_ROOT, 'src/cli.ts'), ...args]);

let dir: string;
let admin: string;
let child: Awaited<ReturnType<typeof spawnDriver>>['child'];
let metadata: ServiceClient<typeof SnapshotMetadata>;

beforeAll(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cbt-faults-cli-'));
  admin = path.join(dir, 'admin.sock');
  fs.writeFileSync(
    path.join(dir, 'faults.yaml'),
    ['faults:', '  - rpc: GetMetadataAllocated', '    action: failed-precondition', '    times: 1', ''].join('\n'),
  );
  const started = await spawnDriver([
    '--endpoint',
    `unix://${path.join(dir, 'csi.sock')}`,
    '--state-dir',
    path.join(dir, 'state'),
    '--log-level',
    'warn',
    '--faults',
    path.join(dir, 'faults.yaml'),
    '--admin-endpoint',
    admin,
  ]);
  child = started.child;
  metadata = new ServiceClient(SnapshotMetadata, `unix://${path.join(dir, 'csi.sock')}`);
}, 60_000);
afterAll(async () => {
  metadata?.close();
  if (child && child.exitCode === null) {
    const exited = new Promise((r) => child.once('exit', r));
    child.kill('SIGTERM');
    await exited;
  }
  fs.rmSync(dir, { recursive: true, force: true });
});

test('serve --faults loads the file; faults list shows it; the rule fires once; add and clear work from the command line', async () => {
  const listed = await cli(['faults', 'list', '--admin-endpoint', admin]);
  expect(listed.stdout).toMatch(/^1\tGetMetadataAllocated\tfailed-precondition\t1 of 1 left/m);
  // The rule fires before the snapshot is even looked up.
  const code = await metadata.collect('getMetadataAllocated', { snapshotId: 'snap-0000000000000000' }).then(
    () => 0,
    (e: { code: number }) => e.code,
  );
  expect(code).toBe(status.FAILED_PRECONDITION);
  const added = await cli([
    'faults',
    'add',
    '--admin-endpoint',
    admin,
    '--rpc',
    'GetMetadataDelta',
    '--action',
    'fail-after',
    '--after-messages',
    '2',
    '--code',
    'UNAVAILABLE',
  ]);
  expect(added.stdout).toMatch(/^added 2\tGetMetadataDelta\tfail-after\tforever/m);
  const json = JSON.parse((await cli(['faults', 'list', '--admin-endpoint', admin, '--json'])).stdout) as {
    id: number;
    fired: number;
  }[];
  expect(json.map((r) => [r.id, r.fired])).toEqual([
    [1, 1],
    [2, 0],
  ]);
  const bad = await cli([
    'faults',
    'add',
    '--admin-endpoint',
    admin,
    '--rpc',
    'GetMetadataDelta',
    '--action',
    'delay',
  ]).catch((e: { stderr: string }) => e);
  expect((bad as { stderr: string }).stderr).toMatch(/rule\.delayMs: required by action delay/);
  expect((await cli(['faults', 'clear', '2', '--admin-endpoint', admin])).stdout).toBe('removed 1 rule\n');
  expect((await cli(['faults', 'clear', '--admin-endpoint', admin])).stdout).toBe('removed 1 rule\n');
  expect((await cli(['faults', 'list', '--admin-endpoint', admin])).stdout).toBe('no fault rules\n');
}, 120_000);

test('a malformed faults file stops serve with the field named', async () => {
  const file = path.join(dir, 'bad.yaml');
  fs.writeFileSync(file, 'faults:\n  - rpc: GetMetadataDelta\n    action: fail-after\n');
  const err = await spawnDriver([
    '--endpoint',
    `unix://${path.join(dir, 'bad.sock')}`,
    '--state-dir',
    path.join(dir, 'bad-state'),
    '--faults',
    file,
  ]).then(
    () => undefined,
    (e: Error) => e,
  );
  expect(err?.message).toMatch(/faults\[0\]\.afterMessages: required by action fail-after/);
}, 60_000);
