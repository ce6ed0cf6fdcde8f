/** The driver's configuration: what `cbt-csi serve` is told, with the embedded defaults `npm start` uses. */
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { ExtentStyle } from '../storage-engine/index.js';
import type { MetadataProfileName } from './csi/metadata-profiles.js';
import type { FaultRule } from './vendor/fault-rules.js';

/** Where the gRPC server listens. */
export type Endpoint = { kind: 'unix'; path: string } | { kind: 'tcp'; host: string; port: number };

/**
 * Which services a process serves. `all`: everything, one process (hostpath-style, and one process a
 * node in a per-node layout). `controller`: Identity, Controller, SnapshotMetadata; no data plane, so
 * no root or /dev/fuse needed. `node`: Identity and Node, with the data plane.
 */
export type DriverRole = 'all' | 'controller' | 'node';
export const DRIVER_ROLES: readonly DriverRole[] = ['all', 'controller', 'node'];
export type LogLevel = 'trace' | 'debug' | 'info' | 'warn' | 'error' | 'fatal' | 'silent';
export const LOG_LEVELS: readonly LogLevel[] = ['trace', 'debug', 'info', 'warn', 'error', 'fatal', 'silent'];

export interface DriverConfig {
  /** CSI driver name reported by GetPluginInfo. */
  driverName: string;
  /** Version reported by GetPluginInfo (package.json's). */
  version: string;
  endpoint: Endpoint;
  /** Where the block store keeps its catalog and layer files. */
  stateDir: string;
  /** This node's ID (NodeGetInfo, topology). */
  nodeId: string;
  /** Block size of volumes whose StorageClass names none. */
  defaultBlockSize: number;
  /** BlockMetadata style of volumes whose StorageClass names none. */
  defaultMetadataStyle: ExtentStyle;
  /** SnapshotMetadata behaviour profile of volumes whose StorageClass names none (metadata-profiles.ts); default exact. */
  defaultMetadataProfile?: MetadataProfileName;
  /** Fault rules in force from the start (serve --faults); none unless configured. */
  faults?: readonly FaultRule[];
  /** Unix socket path of the admin endpoint (cbt-csi faults); undefined: no admin endpoint. */
  adminEndpoint?: string;
  /** Provisioning limit reported by GetCapacity; undefined means the free space of the state directory's disk. */
  capacityBytes: number | undefined;
  /** Tuples per SnapshotMetadata response when the request's max_results is 0. */
  defaultMaxResults: number;
  logLevel: LogLevel;
  /** host:port for the Prometheus /metrics endpoint, or undefined for none. */
  metricsAddress: string | undefined;
  /** Which services to serve; default 'all'. */
  role?: DriverRole;
  /** max_volumes_per_node reported by NodeGetInfo; 0 or undefined lets the CO decide. */
  maxVolumesPerNode?: number;
  /** How long a deleted snapshot stays usable as a delta base (its change record); engine default if unset. */
  deletedSnapshotMaxAgeMs?: number;
  /** How many deleted snapshots per volume stay usable as delta bases; engine default if unset. */
  deletedSnapshotMaxPerVolume?: number;
  /** How long shutdown waits for in-flight calls before resetting them; default DEFAULT_DRAIN_TIMEOUT_MS (server.ts). */
  drainTimeoutMs?: number;
  /**
   * Multi-node mode (docs/adr/0008): handles name their node, and requests for other nodes' objects are
   * forwarded to them over mutual TLS. Undefined: one node, handles unchanged.
   */
  peers?: PeerConfig;
}

/** How this driver reaches, and is reached by, the drivers of other nodes. */
export interface PeerConfig {
  /** Where the peer listener binds (port 0: any free port). */
  listen: { host: string; port: number };
  /** PEM files: this driver's certificate and key (server and client alike) and the peer CA. */
  tls: { cert: string; key: string; ca: string };
  discovery:
    | { kind: 'static'; peers: Readonly<Record<string, string>> }
    | {
        kind: 'kubernetes';
        /** Label selector of the plugin pods. */
        podSelector: string;
        /** Namespace of the plugin pods; default POD_NAMESPACE, else the pod's own. */
        namespace?: string;
        /** Their peer port; default the port of `listen`. */
        port?: number;
      };
}

/** Topology key under which volumes are pinned to the node that holds them. */
export const TOPOLOGY_NODE_KEY = 'topology.cbt.csi.dev/node';

/** Parses `unix:///abs/path.sock`, `unix:relative.sock`, a bare path, or `tcp://127.0.0.1:PORT`. */
export function parseEndpoint(value: string): Endpoint {
  if (value.startsWith('tcp://')) {
    const url = new URL(value);
    const port = Number(url.port);
    if (!url.hostname || url.port === '' || !Number.isInteger(port) || port < 0 || port > 65535) {
      throw new Error(`endpoint ${value}: expected tcp://HOST:PORT`);
    }
    return { kind: 'tcp', host: url.hostname.replace(/^\[|\]$/g, ''), port };
  }
  let socketPath = value;
  if (value.startsWith('unix://')) socketPath = value.slice('unix://'.length);
  else if (value.startsWith('unix:')) socketPath = value.slice('unix:'.length);
  else if (/^[a-z]+:\/\//i.test(value)) throw new Error(`endpoint ${value}: only unix:// and tcp:// are supported`);
  if (!socketPath) throw new Error(`endpoint ${value}: the socket path is empty`);
  return { kind: 'unix', path: path.resolve(socketPath) };
}

/** How an endpoint is written in logs and for clients. */
export function formatEndpoint(endpoint: Endpoint): string {
  return endpoint.kind === 'unix' ? `unix://${endpoint.path}` : `tcp://${endpoint.host}:${endpoint.port}`;
}

/** package.json's version, found by walking up from this file (works from src/ and from dist/src/). */
export function packageVersion(): string {
  let dir = path.dirname(fileURLToPath(import.meta.url));
  for (;;) {
    const candidate = path.join(dir, 'package.json');
    if (fs.existsSync(candidate)) {
      const pkg = JSON.parse(fs.readFileSync(candidate, 'utf8')) as { name?: string; version?: string };
      if (pkg.name === 'cbt-csi' && pkg.version) return pkg.version;
    }
    const parent = path.dirname(dir);
    if (parent === dir) return '0.0.0';
    dir = parent;
  }
}
