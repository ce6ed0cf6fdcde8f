#!/usr/bin/env node
/** The `cbt-csi` command. `serve` runs the driver; with no flags it uses embedded defaults under ./.state. */
import os from 'node:os';
import path from 'node:path';
import { Command, InvalidArgumentError, Option } from 'commander';
import {
  DRIVER_ROLES,
  LOG_LEVELS,
  formatEndpoint,
  packageVersion,
  parseEndpoint,
  type DriverConfig,
  type PeerConfig,
  type DriverRole,
  type LogLevel,
} from './config.js';
import type { ExtentStyle } from '../storage-engine/index.js';
import { createLogger } from './logging.js';
import { startDriver } from './server.js';
import { parseBlockSize } from './csi/volume-parameters.js';
import { loadFaultFile, registerVendorCommands } from './vendor/commands.js';
import { METADATA_PROFILES, type MetadataProfileName } from './csi/metadata-profiles.js';
import { registerBackupCommands } from './backup/commands.js';
import { parseStaticPeers } from './cluster/peer-directory.js';

function positiveInteger(value: string): number {
  const n = Number(value);
  if (!Number.isSafeInteger(n) || n <= 0) throw new InvalidArgumentError('expected a positive integer');
  return n;
}

function nonNegativeSeconds(value: string): number {
  const n = Number(value);
  if (value.trim() === '' || !Number.isFinite(n) || n < 0)
    throw new InvalidArgumentError('expected a number of seconds, 0 or more');
  return n;
}

function nonNegativeDays(value: string): number {
  const n = Number(value);
  if (value.trim() === '' || !Number.isFinite(n) || n < 0)
    throw new InvalidArgumentError('expected a number of days, 0 or more');
  return n;
}

function nonNegativeInteger(value: string): number {
  const n = Number(value);
  if (value.trim() === '' || !Number.isSafeInteger(n) || n < 0)
    throw new InvalidArgumentError('expected a whole number, 0 or more');
  return n;
}

function byteSize(value: string): number {
  const m = /^(\d+)\s*(|k|ki|m|mi|g|gi|t|ti)b?$/i.exec(value.trim());
  if (!m) throw new InvalidArgumentError('expected bytes, e.g. 4096, 64Ki, 100Gi');
  const units: Record<string, number> = {
    '': 1,
    k: 1e3,
    ki: 2 ** 10,
    m: 1e6,
    mi: 2 ** 20,
    g: 1e9,
    gi: 2 ** 30,
    t: 1e12,
    ti: 2 ** 40,
  };
  const n = Number(m[1]) * units[m[2]!.toLowerCase()]!;
  if (!Number.isSafeInteger(n) || n <= 0) throw new InvalidArgumentError('size out of range');
  return n;
}

export function buildProgram(): Command {
  const program = new Command('cbt-csi')
    .description('CSI driver with block-level changed block tracking')
    .version(packageVersion());
  program
    .command('serve')
    .description('run the CSI driver (Identity, Controller, SnapshotMetadata, Node) on a gRPC endpoint')
    .option(
      '--endpoint <endpoint>',
      'unix:///path/csi.sock or tcp://127.0.0.1:PORT (env CSI_ENDPOINT)',
      process.env.CSI_ENDPOINT,
    )
    .option('--state-dir <dir>', 'where volumes and snapshots are stored', '.state')
    .option('--node-id <id>', "this node's ID", os.hostname())
    .option('--driver-name <name>', 'CSI driver name', 'cbt.csi.dev')
    .option(
      '--default-block-size <bytes>',
      'block size of volumes whose StorageClass names none',
      (v) => parseCliBlockSize(v),
      4096,
    )
    .addOption(
      new Option('--metadata-style <style>', 'BlockMetadata style of volumes whose StorageClass names none')
        .choices(['FIXED', 'VARIABLE'])
        .default('VARIABLE'),
    )
    .addOption(
      new Option(
        '--metadata-profile <profile>',
        'SnapshotMetadata behaviour of volumes whose StorageClass names no metadataProfile',
      )
        .choices(METADATA_PROFILES as string[])
        .default('exact'),
    )
    .option('--capacity <bytes>', 'provisioning limit reported by GetCapacity (default: free disk)', byteSize)
    .option('--default-max-results <n>', 'metadata tuples per response when max_results is 0', positiveInteger, 4096)
    .addOption(new Option('--log-level <level>', 'log level').choices(LOG_LEVELS as string[]).default('info'))
    .option(
      '--metrics-address <host:port>',
      'serve Prometheus metrics at http://HOST:PORT/metrics (port 0: any free port)',
    )
    .addOption(
      new Option(
        '--role <role>',
        'services to serve: all, controller (Identity, Controller, SnapshotMetadata) or node (Identity, Node)',
      )
        .choices(DRIVER_ROLES as string[])
        .default('all'),
    )
    .option(
      '--max-volumes-per-node <n>',
      'max_volumes_per_node reported by NodeGetInfo (default: the CO decides)',
      positiveInteger,
    )
    .option(
      '--deleted-snapshot-retention <days>',
      'how long a deleted snapshot stays usable as GetMetadataDelta base (its change record), then FAILED_PRECONDITION',
      nonNegativeDays,
      30,
    )
    .option(
      '--deleted-snapshot-max <n>',
      'deleted snapshots per volume kept usable as delta bases (oldest expire first)',
      nonNegativeInteger,
      256,
    )
    .option('--faults <file>', 'vendor bench: fault rules (YAML) in force from the start; none unless given')
    .option('--admin-endpoint <path>', 'vendor bench: unix socket (0600) for `cbt-csi faults`; off unless given')
    .option(
      '--drain-timeout <seconds>',
      'on SIGTERM, how long in-flight calls may take before they are reset',
      nonNegativeSeconds,
      25,
    )
    .option(
      '--peer-listen <host:port>',
      "multi-node: serve other nodes' drivers here (mutual TLS); handles then name their node (docs/adr/0008)",
    )
    .option('--peer-tls-cert <file>', "multi-node: this driver's certificate (PEM), as server and as client")
    .option('--peer-tls-key <file>', 'multi-node: the key of --peer-tls-cert (PEM)')
    .option('--peer-tls-ca <file>', "multi-node: the CA (PEM) peers' certificates must chain to")
    .option('--peers <list>', "multi-node, static discovery: NODE=HOST:PORT,... of the other nodes' peer listeners")
    .addOption(
      new Option('--peer-discovery <how>', 'multi-node: how peers are found (kubernetes: the plugin pods by label)')
        .choices(['static', 'kubernetes'])
        .default('static'),
    )
    .option('--peer-pod-selector <selector>', 'multi-node, kubernetes discovery: label selector of the plugin pods')
    .option(
      '--peer-namespace <namespace>',
      "multi-node, kubernetes discovery: namespace of the plugin pods (default POD_NAMESPACE, else the pod's own)",
    )
    .action(async (opts: ServeFlags) => {
      await serve(opts);
    });
  registerVendorCommands(program);
  registerBackupCommands(program);
  return program;
}

function parseCliBlockSize(value: string): number {
  try {
    return parseBlockSize(value);
  } catch (err) {
    throw new InvalidArgumentError((err as Error).message);
  }
}

interface ServeFlags {
  endpoint?: string;
  stateDir: string;
  nodeId: string;
  driverName: string;
  defaultBlockSize: number;
  metadataStyle: ExtentStyle;
  metadataProfile: MetadataProfileName;
  capacity?: number;
  defaultMaxResults: number;
  logLevel: LogLevel;
  metricsAddress?: string;
  drainTimeout: number;
  role: DriverRole;
  maxVolumesPerNode?: number;
  /** Days (fractions allowed). */
  deletedSnapshotRetention: number;
  deletedSnapshotMax: number;
  faults?: string;
  adminEndpoint?: string;
  peerListen?: string;
  peerTlsCert?: string;
  peerTlsKey?: string;
  peerTlsCa?: string;
  peers?: string;
  peerDiscovery: 'static' | 'kubernetes';
  peerPodSelector?: string;
  peerNamespace?: string;
}

/** Multi-node settings from the flags: none without --peer-listen; everything else it needs is then required. */
function peerConfig(flags: ServeFlags): PeerConfig | undefined {
  const peerFlags = [flags.peers, flags.peerTlsCert, flags.peerTlsKey, flags.peerTlsCa, flags.peerPodSelector];
  if (!flags.peerListen) {
    if (peerFlags.some((f) => f !== undefined) || flags.peerDiscovery !== 'static') {
      throw new Error('the --peer-* flags and --peers need --peer-listen');
    }
    return undefined;
  }
  const listen = parseListenAddress(flags.peerListen);
  const need = (value: string | undefined, flag: string): string => {
    if (!value) throw new Error(`--peer-listen needs ${flag}: peers talk mutual TLS only`);
    return path.resolve(value);
  };
  const tls = {
    cert: need(flags.peerTlsCert, '--peer-tls-cert'),
    key: need(flags.peerTlsKey, '--peer-tls-key'),
    ca: need(flags.peerTlsCa, '--peer-tls-ca'),
  };
  if (flags.peerDiscovery === 'kubernetes') {
    if (!flags.peerPodSelector) throw new Error('--peer-discovery kubernetes needs --peer-pod-selector');
    if (flags.peers) throw new Error('--peers is for --peer-discovery static');
    return {
      listen,
      tls,
      discovery: { kind: 'kubernetes', podSelector: flags.peerPodSelector, namespace: flags.peerNamespace },
    };
  }
  if (flags.peerPodSelector || flags.peerNamespace) {
    throw new Error('--peer-pod-selector and --peer-namespace are for --peer-discovery kubernetes');
  }
  return {
    listen,
    tls,
    discovery: { kind: 'static', peers: Object.fromEntries(parseStaticPeers(flags.peers ?? '')) },
  };
}

/**
 * HOST:PORT to listen on (port 0: any free port). The port is after the last colon, so an IPv6 address may
 * come bare or in brackets (`$(POD_IP):9820` works for both families).
 */
function parseListenAddress(value: string): { host: string; port: number } {
  const at = value.lastIndexOf(':');
  const host = value.slice(0, Math.max(at, 0)).replace(/^\[(.*)\]$/, '$1');
  const portText = value.slice(at + 1);
  const port = Number(portText);
  if (at <= 0 || host === '' || !/^\d{1,5}$/.test(portText) || port > 65535) {
    throw new Error(`--peer-listen ${value}: expected HOST:PORT`);
  }
  return { host, port };
}

async function serve(flags: ServeFlags): Promise<void> {
  const stateDir = path.resolve(flags.stateDir);
  const config: DriverConfig = {
    driverName: flags.driverName,
    version: packageVersion(),
    endpoint: parseEndpoint(flags.endpoint ?? path.join(stateDir, 'csi.sock')),
    stateDir,
    nodeId: flags.nodeId,
    defaultBlockSize: flags.defaultBlockSize,
    defaultMetadataStyle: flags.metadataStyle,
    defaultMetadataProfile: flags.metadataProfile,
    capacityBytes: flags.capacity,
    defaultMaxResults: flags.defaultMaxResults,
    logLevel: flags.logLevel,
    metricsAddress: flags.metricsAddress,
    drainTimeoutMs: Math.round(flags.drainTimeout * 1000),
    role: flags.role,
    maxVolumesPerNode: flags.maxVolumesPerNode,
    deletedSnapshotMaxAgeMs: Math.round(flags.deletedSnapshotRetention * 24 * 3600 * 1000),
    deletedSnapshotMaxPerVolume: flags.deletedSnapshotMax,
    faults: flags.faults ? loadFaultFile(flags.faults) : [],
    adminEndpoint: flags.adminEndpoint ? path.resolve(flags.adminEndpoint) : undefined,
    peers: peerConfig(flags),
  };
  const logger = createLogger(config.logLevel);
  const driver = await startDriver(config, logger);
  // People starting it by hand want to know where to point a client. One write, "listening" last:
  // whoever waits for that line (a test, a script) then has the metrics URL too.
  const metricsLine = driver.metricsUrl ? `cbt-csi metrics at ${driver.metricsUrl}\n` : '';
  const peerLine = driver.peerAddress
    ? `cbt-csi peers at ${driver.peerAddress.host}:${driver.peerAddress.port} (mutual TLS)\n`
    : '';
  process.stderr.write(`${metricsLine}${peerLine}cbt-csi listening on ${formatEndpoint(driver.endpoint)}\n`);
  let signals = 0;
  const onSignal = (signal: NodeJS.Signals) => {
    if (++signals > 1) process.exit(1);
    logger.info({ signal }, 'shutting down');
    driver.stop().then(
      () => {
        logger.flush();
        process.exit(0);
      },
      (err: unknown) => {
        logger.error({ err: String(err) }, 'shutdown failed');
        process.exit(1);
      },
    );
  };
  process.on('SIGTERM', onSignal);
  process.on('SIGINT', onSignal);
}

buildProgram()
  .parseAsync(process.argv)
  .catch((err: unknown) => {
    process.stderr.write(`cbt-csi: ${err instanceof Error ? err.message : String(err)}\n`);
    process.exit(1);
  });
