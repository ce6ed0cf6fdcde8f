/**
 * Multi-node mode, put together from the driver's configuration: this node's ID checked for use in handles,
 * the peer TLS material, the peer directory (static or Kubernetes) and the clients that forward to peers.
 * The gRPC client and the Kubernetes client are loaded only here, when peers are configured: loading them
 * takes seconds on a busy machine, which single mode should not pay at every start.
 */
import type { DriverConfig } from '../config.js';
import type { Logger } from '../logging.js';
import type { DriverMetrics } from '../metrics.js';
import { ownerNodeIdProblem } from './node-handles.js';
import { type PeerDirectory, StaticPeerDirectory } from './peer-directory.js';
import { loadPeerTls, type PeerTls } from './peer-tls.js';
import type { Routing } from './routing.js';

export interface Cluster {
  readonly routing: Routing;
  readonly tls: PeerTls;
  close(): void;
}

/** Builds multi-node mode from `config.peers`; throws (before anything listens) on a bad configuration. */
export async function setUpCluster(
  config: DriverConfig,
  metrics: DriverMetrics,
  logger: Logger,
): Promise<Cluster | undefined> {
  const peers = config.peers;
  if (!peers) return undefined;
  const problem = ownerNodeIdProblem(config.nodeId);
  if (problem) throw new Error(problem);
  const tls = loadPeerTls(peers.tls);
  let directory: PeerDirectory;
  if (peers.discovery.kind === 'static') {
    const others = new Map(Object.entries(peers.discovery.peers).filter(([node]) => node !== config.nodeId));
    directory = new StaticPeerDirectory(others);
  } else {
    const port = peers.discovery.port ?? peers.listen.port;
    if (port === 0) throw new Error('--peer-discovery kubernetes needs the peer port: give --peer-listen a fixed port');
    const { KubernetesPeerDirectory } = await import('./kubernetes-directory.js');
    directory = new KubernetesPeerDirectory(
      { namespace: peers.discovery.namespace, podSelector: peers.discovery.podSelector, port },
      logger,
    );
  }
  const { PeerClients, peerChannelCredentials } = await import('./peer-client.js');
  const clients = new PeerClients({
    directory,
    credentials: peerChannelCredentials(tls),
    metrics,
  });
  return {
    routing: { self: config.nodeId, peers: clients },
    tls,
    close() {
      clients.close();
      directory.close();
    },
  };
}
