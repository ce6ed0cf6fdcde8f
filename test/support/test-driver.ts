/** Starts a real driver (in this process, or as a child running `cbt-csi serve`) on a unix socket in a temp dir. */
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { Controller, Identity, SnapshotMetadata } from '../../src/gen/csi/v1/csi_pb.js';
import { packageVersion, type DriverConfig } from '../../src/config.js';
import { createLogger } from '../../src/logging.js';
import { startDriver, type RunningDriver } from '../../src/server.js';
import { ServiceClient } from './csi-client.js';

export const REPO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');

/** tsx's loader by absolute URL: `--import tsx` is resolved from the child's working directory. */
export const TSX_LOADER = pathToFileURL(path.join(REPO_ROOT, 'node_modules/tsx/dist/loader.mjs')).href;

export interface TestDriver {
  dir: string;
  socket: string;
  target: string;
  driver: RunningDriver;
  identity: ServiceClient<typeof Identity>;
  controller: ServiceClient<typeof Controller>;
  metadata: ServiceClient<typeof SnapshotMetadata>;
  /** Stops the driver and removes the temp dir. */
  stop(): Promise<void>;
}

/** Config for tests: everything under `dir`, logs silent unless CBT_TEST_LOG is set. */
export function testConfig(dir: string, overrides: Partial<DriverConfig> = {}): DriverConfig {
  return {
    driverName: 'cbt.csi.dev',
    version: packageVersion(),
    endpoint: { kind: 'unix', path: path.join(dir, 'csi.sock') },
    stateDir: path.join(dir, 'state'),
    nodeId: 'test-node',
    defaultBlockSize: 4096,
    defaultMetadataStyle: 'VARIABLE',
    capacityBytes: undefined,
    defaultMaxResults: 4096,
    logLevel: (process.env.CBT_TEST_LOG as DriverConfig['logLevel'] | undefined) ?? 'silent',
    metricsAddress: undefined,
    ...overrides,
  };
}

/** Starts the driver in-process; talk to it through the returned grpc-js clients. */
export async function startTestDriver(overrides: Partial<DriverConfig> = {}): Promise<TestDriver> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cbt-csi-test-'));
  const config = testConfig(dir, overrides);
  const driver = await startDriver(config, createLogger(config.logLevel));
  const socket = driver.endpoint.kind === 'unix' ? driver.endpoint.path : '';
  const target =
    driver.endpoint.kind === 'unix' ? `unix://${socket}` : `${driver.endpoint.host}:${driver.endpoint.port}`;
  const identity = new ServiceClient(Identity, target);
  const controller = new ServiceClient(Controller, target);
  const metadata = new ServiceClient(SnapshotMetadata, target);
  return {
    dir,
    socket,
    target,
    driver,
    identity,
    controller,
    metadata,
    async stop() {
      identity.close();
      controller.close();
      metadata.close();
      await driver.stop();
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

/**
 * Runs `cbt-csi serve` as a child process (through tsx) and resolves once its socket answers. With `umask`,
 * the child starts under that umask (set by a shell that then execs node), as a container runtime may.
 */
export async function spawnDriver(
  args: string[],
  options: { cwd?: string; env?: NodeJS.ProcessEnv; umask?: number; startTimeoutMs?: number } = {},
): Promise<{ child: ChildProcess; stderr: () => string; stdout: () => string }> {
  const command = [process.execPath, '--import', TSX_LOADER, path.join(REPO_ROOT, 'src/cli.ts'), 'serve', ...args];
  const [file, argv] =
    options.umask === undefined
      ? [command[0]!, command.slice(1)]
      : ['/bin/sh', ['-c', `umask ${options.umask.toString(8).padStart(3, '0')} && exec "$@"`, 'sh', ...command]];
  const child = spawn(file, argv, {
    cwd: options.cwd ?? REPO_ROOT,
    env: { ...process.env, ...options.env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let err = '';
  let out = '';
  child.stderr!.on('data', (d: Buffer) => (err += d.toString()));
  child.stdout!.on('data', (d: Buffer) => (out += d.toString()));
  await new Promise<void>((resolve, reject) => {
    const startTimeoutMs = options.startTimeoutMs ?? 30_000;
    const timer = setTimeout(
      () => reject(new Error(`driver did not start in ${startTimeoutMs / 1000} s: ${err}`)),
      startTimeoutMs,
    );
    const check = () => {
      if (err.includes('listening on')) {
        clearTimeout(timer);
        resolve();
      }
    };
    child.stderr!.on('data', check);
    child.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`driver exited with ${code}: ${err}`));
    });
  });
  return { child, stderr: () => err, stdout: () => out };
}
