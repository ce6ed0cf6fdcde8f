/**
 * Wires the driver: opens the block store, registers the CSI services on a connect router speaking
 * the gRPC protocol only, and serves it over HTTP/2 cleartext on a unix socket (or loopback TCP).
 * stop() drains: no new calls are accepted, in-flight calls and streams finish (within the drain
 * timeout), then the store closes and the socket file is removed.
 */
import { setMaxListeners } from 'node:events';
import fs from 'node:fs';
import http2 from 'node:http2';
import path from 'node:path';
import net, { type AddressInfo } from 'node:net';
import type { DescService } from '@bufbuild/protobuf';
import type { ConnectRouter, ServiceImpl } from '@connectrpc/connect';
import { connectNodeAdapter } from '@connectrpc/connect-node';
import { BlockStore } from '../storage-engine/index.js';
import { formatEndpoint, type DriverConfig, type Endpoint } from './config.js';
import { SOCKET_MODE, makePrivateDirectory, withSocketUmask } from './file-modes.js';
import { controllerService } from './csi/controller-service.js';
import { groupControllerService } from './csi/group-controller-service.js';
import { NodeVolumes } from './dataplane/node-volumes.js';
import { nodeService } from './csi/node-service.js';
import type { DriverContext } from './csi/driver-context.js';
import { identityService } from './csi/identity-service.js';
import { snapshotMetadataService } from './csi/snapshot-metadata-service.js';
import { storeEventReporter } from './store-events.js';
import { Controller, GroupController, Identity, Node, SnapshotMetadata } from './gen/csi/v1/csi_pb.js';
import type { Logger } from './logging.js';
import { DriverMetrics } from './metrics.js';
import { observeRpcs } from './rpc/interceptors.js';
import { correctUndecodableStatus, unimplementedMethodHeaders } from './rpc/status.js';
import { tupleCount } from './csi/block-metadata-wire.js';
import { FaultInjector } from './vendor/fault-injector.js';
import { startAdminEndpoint, type AdminEndpoint } from './vendor/admin-endpoint.js';
import type { setUpCluster as SetUpCluster } from './cluster/cluster.js';
import { ownedHandle, withoutOwner } from './cluster/node-handles.js';
import { type RoutePolicy, routedService } from './cluster/routing.js';
import { startPeerServer, type PeerServer } from './cluster/peer-server.js';

/** A running driver. */
export interface RunningDriver {
  /** Where it listens (a tcp endpoint shows the bound port). */
  readonly endpoint: Endpoint;
  /** Where the peer listener is (multi-node mode; the bound port), or undefined. */
  readonly peerAddress: { host: string; port: number } | undefined;
  readonly metricsUrl: string | undefined;
  readonly store: BlockStore;
  /** Injected fault rules (vendor bench); empty unless configured. */
  readonly faults: FaultInjector;
  /** Drains calls, closes the store, removes the socket. Idempotent. */
  stop(): Promise<void>;
}

/** How long stop() lets in-flight calls finish: below Kubernetes' default 30 s termination grace period. */
export const DEFAULT_DRAIN_TIMEOUT_MS = 25_000;

/** Largest request we accept: CSI requests are small; this bounds a hostile client's memory use. */
const READ_MAX_BYTES = 4 * 1024 * 1024;

export async function startDriver(config: DriverConfig, logger: Logger): Promise<RunningDriver> {
  makePrivateDirectory(config.stateDir);
  const metrics = new DriverMetrics();
  const reportStoreEvent = storeEventReporter(logger, metrics.registry);
  let nodeVolumes: NodeVolumes | undefined;
  // Multi-node mode: a bad peer configuration fails here, before the store is opened.
  const cluster = config.peers ? await setUpCluster(config, metrics, logger) : undefined;
  const store = BlockStore.open(path.join(config.stateDir, 'store'), {
    defaultBlockSize: config.defaultBlockSize,
    // The engine enforces the limit after its last await, so concurrent creates cannot overshoot it.
    capacityLimitBytes: config.capacityBytes,
    onEvent: (event) => {
      reportStoreEvent(event);
      // ControllerModifyVolume stored new attributes: the node data plane reads its I/O limits again.
      if (event.type === 'volume-attributes-changed') nodeVolumes?.volumeAttributesChanged(event.volumeId);
    },
    deletedSnapshotRetention: {
      maxAgeMs: config.deletedSnapshotMaxAgeMs,
      maxPerVolume: config.deletedSnapshotMaxPerVolume,
    },
  });
  const role = config.role ?? 'all';
  // The node data plane shares this process's store: a store is opened once, by one process.
  nodeVolumes = role === 'controller' ? undefined : new NodeVolumes({ store, stateDir: config.stateDir, logger });
  try {
    // Recovery only (stale mount, records); the FUSE mount itself is made when a volume is first staged.
    await nodeVolumes?.start();
  } catch (err) {
    await store.close();
    throw err;
  }
  let ready = false;
  const ctx: DriverContext = { store, config, logger, isReady: () => ready };
  const faults = new FaultInjector(
    {
      logger,
      metrics,
      // Rules name objects by the handles clients see (with the owner suffix in multi-node mode).
      volumeOfSnapshot: (id) => {
        const volume = snapshotVolume(store, cluster ? withoutOwner(id, config.nodeId) : id);
        return volume !== undefined && cluster ? ownedHandle(volume, config.nodeId) : volume;
      },
    },
    config.faults ?? [],
  );
  const shutdown = new AbortController();
  // Every in-flight call listens on the shutdown signal; many concurrent calls are normal, not a leak.
  setMaxListeners(0, shutdown.signal);

  const services = {
    identity: identityService(ctx),
    controller: role !== 'node' ? controllerService(ctx) : undefined,
    groupController: role !== 'node' ? groupControllerService(ctx) : undefined,
    snapshotMetadata: role !== 'node' ? snapshotMetadataService(ctx) : undefined,
    node: nodeVolumes ? nodeService(ctx, nodeVolumes) : undefined,
  };
  /** A service as a listener serves it: routed by owner in multi-node mode, as it is otherwise. */
  const serve = <S extends DescService>(service: S, impl: Partial<ServiceImpl<S>>, policy: RoutePolicy) =>
    cluster ? routedService(service, impl, cluster.routing, policy) : impl;

  const handler = connectHandler(shutdown.signal, logger, metrics, faults, (router: ConnectRouter) => {
    router.service(Identity, services.identity);
    if (services.controller) router.service(Controller, serve(Controller, services.controller, 'forward'));
    if (services.groupController) {
      router.service(GroupController, serve(GroupController, services.groupController, 'forward'));
    }
    if (services.snapshotMetadata) {
      router.service(SnapshotMetadata, serve(SnapshotMetadata, services.snapshotMetadata, 'forward'));
    }
    if (services.node) router.service(Node, serve(Node, services.node, 'node-local'));
  });
  // Other nodes' drivers get what can be forwarded, for this node's objects only (never forwarded again).
  const peerHandler =
    cluster &&
    connectHandler(shutdown.signal, logger, metrics, faults, (router: ConnectRouter) => {
      router.service(Identity, services.identity);
      if (services.controller) router.service(Controller, serve(Controller, services.controller, 'own-only'));
      if (services.groupController) {
        router.service(GroupController, serve(GroupController, services.groupController, 'own-only'));
      }
      if (services.snapshotMetadata) {
        router.service(SnapshotMetadata, serve(SnapshotMetadata, services.snapshotMetadata, 'own-only'));
      }
    });

  const server = http2.createServer({}, requestListener(handler));
  const sessions = new Set<http2.ServerHttp2Session>();
  server.on('session', (session) => {
    sessions.add(session);
    session.once('close', () => sessions.delete(session));
  });

  // Metrics first: a bad --metrics-address must fail before the CSI socket exists, so nothing is left behind.
  let metricsServer: Awaited<ReturnType<DriverMetrics['serve']>> | undefined;
  let admin: AdminEndpoint | undefined;
  let peerServer: PeerServer | undefined;
  let endpoint = config.endpoint;
  try {
    metricsServer = config.metricsAddress ? await metrics.serve(config.metricsAddress) : undefined;
    admin = config.adminEndpoint ? await startAdminEndpoint(config.adminEndpoint, faults, logger) : undefined;
    if (cluster && peerHandler && config.peers) {
      peerServer = await startPeerServer({
        listen: config.peers.listen,
        tls: cluster.tls,
        nodeId: config.nodeId,
        handle: requestListener(peerHandler),
        logger,
      });
    }
    endpoint = await listen(server, config.endpoint);
  } catch (err) {
    if (peerServer) {
      peerServer.destroy();
      await peerServer.drain();
    }
    cluster?.close();
    await admin?.close();
    if (metricsServer) await new Promise<void>((resolve) => metricsServer!.server.close(() => resolve()));
    await nodeVolumes?.stop();
    await store.close();
    throw err;
  }
  ready = true;
  logger.info(
    { endpoint: formatEndpoint(endpoint), driver: config.driverName, version: config.version, role },
    'serving',
  );

  let stopping: Promise<void> | undefined;
  const stop = () =>
    (stopping ??= (async () => {
      ready = false;
      logger.info('draining');
      const closed = Promise.all([
        new Promise<void>((resolve) => server.close(() => resolve())),
        peerServer?.drain(),
      ]).then(() => undefined);
      // GOAWAY: sessions finish the streams they have and take no new ones.
      for (const session of sessions) session.close();
      const drained = await Promise.race([
        closed.then(() => true),
        new Promise<false>((resolve) =>
          setTimeout(resolve, config.drainTimeoutMs ?? DEFAULT_DRAIN_TIMEOUT_MS, false).unref(),
        ),
      ]);
      shutdown.abort();
      if (!drained) {
        // A client that stopped reading would hold a stream (and us) forever: reset what is left, so
        // those clients see an error rather than a stream that merely stops.
        logger.warn({ sessions: sessions.size }, 'drain timed out; resetting the remaining calls');
        for (const session of sessions) session.destroy();
        peerServer?.destroy();
        await closed;
      }
      cluster?.close();
      await new Promise<void>((resolve) => (metricsServer ? metricsServer.server.close(() => resolve()) : resolve()));
      await admin?.close();
      // Devices still attached to volume files fail from here on (documented in docs/node-data-plane.md).
      await nodeVolumes
        ?.stop()
        .catch((err: unknown) => logger.error({ err: String(err) }, 'unmounting the volume files failed'));
      await store.close();
      if (endpoint.kind === 'unix') fs.rmSync(endpoint.path, { force: true });
      logger.info('stopped');
    })());

  return { endpoint, peerAddress: peerServer?.address, metricsUrl: metricsServer?.url, store, faults, stop };
}

/** Multi-node mode, loaded only when peers are configured (cluster.ts says why). */
const setUpCluster: typeof SetUpCluster = async (...args) =>
  (await import('./cluster/cluster.js')).setUpCluster(...args);

/** The gRPC handler of one listener: connect, gRPC protocol only, with the driver's interceptors. */
function connectHandler(
  shutdownSignal: AbortSignal,
  logger: Logger,
  metrics: DriverMetrics,
  faults: FaultInjector,
  routes: (router: ConnectRouter) => void,
) {
  return connectNodeAdapter({
    grpc: true,
    connect: false,
    grpcWeb: false,
    readMaxBytes: READ_MAX_BYTES,
    // Clients are on this node (a unix socket): compressing responses would only spend CPU on both ends
    // (gzip took a sixth of the driver's CPU streaming SnapshotMetadata, and as much in the client). Compressed
    // requests are still read.
    compressMinBytes: Number.POSITIVE_INFINITY,
    shutdownSignal,
    // SnapshotMetadata responses count their BlockMetadata tuples for the logs and metrics.
    interceptors: [observeRpcs(logger, metrics, { countItems: tupleCount }), faults.interceptor()],
    // A service we do not serve (e.g. Node in the controller role) must still get a gRPC status, not a bare
    // HTTP 404: headers-only, ended on the HEADERS frame, as grpc-go expects. Headers set before (the peer
    // listener's node stamp) go along.
    fallback: (req, res) => {
      const headers = unimplementedMethodHeaders(req.url ?? '');
      if ('stream' in res) res.stream.respond({ ':status': 200, ...res.getHeaders(), ...headers }, { endStream: true });
      else res.writeHead(200, headers).end();
    },
    routes,
  });
}

/** What every request goes through before connect: status corrections, and release of writes on reset. */
function requestListener(handler: ReturnType<typeof connectNodeAdapter>) {
  return (req: http2.Http2ServerRequest, res: http2.Http2ServerResponse) => {
    answerUndecodableAsInvalid(res);
    releaseWritesOnReset(res);
    handler(req, res);
  };
}

/** The volume a snapshot was taken of, for fault rules that name a volume. */
function snapshotVolume(store: BlockStore, snapshotId: string): string | undefined {
  try {
    return store.getSnapshot(snapshotId).sourceVolumeId;
  } catch {
    return undefined;
  }
}

/** connect's INTERNAL for a body it cannot decode is corrected in the trailers on their way out (status.ts). */
function answerUndecodableAsInvalid(res: http2.Http2ServerResponse): void {
  const addTrailers = res.addTrailers.bind(res);
  res.addTrailers = (trailers: http2.OutgoingHttpHeaders) => addTrailers(correctUndecodableStatus(trailers));
}

/**
 * A client that resets a stream (a cancelled call) while the server waits on HTTP/2 flow control closes it
 * with neither 'drain' nor 'error', and node never completes the pending write, so connect's writer would
 * wait for ever: the RPC would never end (no log line, its extent iterator held open). Releasing that wait
 * lets connect see the reset and end the RPC with its status (CANCELLED for a cancel).
 */
function releaseWritesOnReset(res: http2.Http2ServerResponse): void {
  res.once('close', () => {
    // connect listens for 'drain' only while one of its writes waits.
    if (!res.writableEnded && res.listenerCount('drain') > 0) res.emit('drain');
  });
}

/** Binds the server; a stale unix socket left by a killed process is replaced, a live one is an error. */
async function listen(server: http2.Http2Server, endpoint: Endpoint): Promise<Endpoint> {
  if (endpoint.kind === 'unix') {
    makePrivateDirectory(path.dirname(endpoint.path));
    const existing = fs.lstatSync(endpoint.path, { throwIfNoEntry: false });
    if (existing) {
      // Only ever remove a socket: an endpoint mistyped onto a real file must not delete it.
      if (!existing.isSocket()) throw new Error(`${endpoint.path} exists and is not a socket; refusing to replace it`);
      if (await socketAnswers(endpoint.path)) throw new Error(`${endpoint.path} is in use by another server`);
      fs.rmSync(endpoint.path, { force: true });
    }
  }
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    if (endpoint.kind === 'unix') {
      withSocketUmask(() =>
        server.listen(endpoint.path, () => {
          try {
            fs.chmodSync(endpoint.path, SOCKET_MODE);
            resolve();
          } catch (err) {
            reject(err as Error);
          }
        }),
      );
    } else server.listen(endpoint.port, endpoint.host, () => resolve());
  });
  if (endpoint.kind === 'tcp') return { ...endpoint, port: (server.address() as AddressInfo).port };
  return endpoint;
}

function socketAnswers(socketPath: string): Promise<boolean> {
  return new Promise((resolve) => {
    const session = http2.connect('http://localhost', { createConnection: () => net.connect(socketPath) });
    const done = (answer: boolean) => {
      session.destroy();
      resolve(answer);
    };
    session.once('connect', () => done(true));
    session.once('error', () => done(false));
  });
}
