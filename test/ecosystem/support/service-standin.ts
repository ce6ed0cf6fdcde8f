/**
 * A ClusterIP Service in a headless cluster, done by hand (there is no kube-proxy and no EndpointSlice
 * controller): one address on loopback, and each new TCP connection passed whole to one of the Service's
 * endpoints, in turn, skipping endpoints whose pod is not ready, as the EndpointSlice controller drops a
 * NotReady pod and kube-proxy spreads connections over the rest. With no ready endpoint a connection is
 * reset, as kube-proxy rejects it. Bytes are passed through untouched (TLS ends at the endpoint).
 */
import net from 'node:net';

export interface ServiceEndpoint {
  /** What the endpoint is, e.g. its pod's node. */
  name: string;
  /** Where it listens on 127.0.0.1. */
  port: number;
  /** Its pod's Ready condition. */
  ready(): boolean;
}

export class ServiceStandIn {
  /** The endpoint each connection went to, in order (`undefined`: none was ready, the connection was reset). */
  readonly routed: (string | undefined)[] = [];
  private next = 0;
  private readonly sockets = new Set<net.Socket>();

  private constructor(
    private readonly server: net.Server,
    private readonly endpoints: readonly ServiceEndpoint[],
    /** host:port clients dial. */
    readonly address: string,
  ) {}

  static async start(endpoints: readonly ServiceEndpoint[]): Promise<ServiceStandIn> {
    const server = net.createServer();
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(0, '127.0.0.1', () => resolve());
    });
    const { port } = server.address() as net.AddressInfo;
    const service = new ServiceStandIn(server, endpoints, `127.0.0.1:${port}`);
    server.on('connection', (client) => service.pass(client));
    return service;
  }

  private pass(client: net.Socket): void {
    const ready = this.endpoints.filter((e) => e.ready());
    const endpoint = ready.length > 0 ? ready[this.next++ % ready.length] : undefined;
    this.routed.push(endpoint?.name);
    if (!endpoint) {
      client.resetAndDestroy();
      return;
    }
    const upstream = net.connect({ host: '127.0.0.1', port: endpoint.port });
    for (const socket of [client, upstream]) {
      socket.setNoDelay(true);
      this.sockets.add(socket);
      socket.once('close', () => this.sockets.delete(socket));
    }
    // A reset on one side resets the other, so the client sees the endpoint go away as it would.
    client.on('error', () => upstream.resetAndDestroy());
    upstream.on('error', () => client.resetAndDestroy());
    client.pipe(upstream);
    upstream.pipe(client);
  }

  /** Stops listening and cuts every connection still open. */
  async close(): Promise<void> {
    for (const socket of this.sockets) socket.destroy();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }
}
