/**
 * Where each node's driver listens for peers. One small interface, so routing does not care how it is
 * found: a static list (`--peers`, for tests and fixed clusters) or the DaemonSet's pods in Kubernetes
 * (kubernetes-directory.ts).
 */

/** host:port of a peer's listener. */
export type PeerAddress = string;

export interface PeerDirectory {
  /** The address of `node`'s driver, or undefined when no driver is known for that node. */
  lookup(node: string): Promise<PeerAddress | undefined>;
  /** A call to `node` failed to connect: the next lookup should not trust what is cached. */
  invalidate(node: string): void;
  close(): void;
}

/** A fixed list of nodes and addresses. */
export class StaticPeerDirectory implements PeerDirectory {
  constructor(private readonly peers: ReadonlyMap<string, PeerAddress>) {}

  lookup(node: string): Promise<PeerAddress | undefined> {
    return Promise.resolve(this.peers.get(node));
  }

  invalidate(): void {}

  close(): void {}
}

/** Parses `--peers node-a=10.0.0.1:9820,node-b=[fd00::2]:9820`. */
export function parseStaticPeers(value: string): Map<string, PeerAddress> {
  const peers = new Map<string, PeerAddress>();
  for (const entry of value.split(',').map((s) => s.trim())) {
    if (entry === '') continue;
    const eq = entry.indexOf('=');
    const node = eq > 0 ? entry.slice(0, eq) : '';
    const address = eq > 0 ? entry.slice(eq + 1) : '';
    if (!node || !isHostPort(address)) {
      throw new Error(`--peers entry ${JSON.stringify(entry)}: expected NODE=HOST:PORT`);
    }
    if (peers.has(node)) throw new Error(`--peers names node ${node} twice`);
    peers.set(node, address);
  }
  return peers;
}

/** HOST:PORT with a port from 1 to 65535 (IPv6 hosts in brackets). */
export function isHostPort(value: string): boolean {
  const m = /^(\[[0-9a-fA-F:.]+\]|[^:[\]\s]+):(\d{1,5})$/.exec(value);
  return m !== null && Number(m[2]) >= 1 && Number(m[2]) <= 65535;
}
