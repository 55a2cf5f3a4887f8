import t from 'tap';
import { ConfigError, loadConfig } from '../src/config.ts';

t.test('defaults, then environment, then flags', async (t) => {
  const d = loadConfig([], {}, '/srv');
  t.match(d, { listenAddress: '127.0.0.1', port: 8443, storage: 'sqlite', dataDir: '/srv/data', certDir: '/srv/certs', tlsCertFile: '/srv/certs/server.crt', clientCaFile: '/srv/certs/ca.crt' });
  t.ok(Object.isFrozen(d), 'the config is frozen');
  const e = loadConfig([], { KMM_PREFLIGHT_PORT: '9443', KMM_PREFLIGHT_LOG_LEVEL: 'debug' }, '/srv');
  t.equal(e.port, 9443);
  t.equal(e.logLevel, 'debug');
  const f = loadConfig(['--port', '10443', '--cert-dir', 'pki'], { KMM_PREFLIGHT_PORT: '9443' }, '/srv');
  t.equal(f.port, 10443, 'flags win over the environment');
  t.equal(f.tlsPrivateKeyFile, '/srv/pki/server.key', 'file defaults follow --cert-dir');
});

t.test('every bad option is named, with its flag and variable', async (t) => {
  const err = t.throws(() => loadConfig(['--port', 'http', '--log-level', 'loud'], { KMM_PREFLIGHT_HISTORY_SECONDS: '0' }, '/srv')) as ConfigError;
  t.ok(err instanceof ConfigError);
  t.equal(err.problems.length, 3);
  t.match(err.message, /--port \(KMM_PREFLIGHT_PORT\) must be integer, got "http"/);
  t.match(err.message, /--log-level \(KMM_PREFLIGHT_LOG_LEVEL\) must be equal to one of the allowed values, got "loud"/);
  t.match(err.message, /--history-seconds \(KMM_PREFLIGHT_HISTORY_SECONDS\) must be >= 1/);
});

t.test('an unknown flag is refused', async (t) => {
  t.throws(() => loadConfig(['--prot', '1'], {}, '/srv'), /Unknown option '--prot'/);
});

t.test('etcd storage needs servers, and client certificate and key go together', async (t) => {
  t.throws(() => loadConfig(['--storage', 'etcd'], {}, '/srv'), /--etcd-servers \(KMM_PREFLIGHT_ETCD_SERVERS\) is required with --storage etcd/);
  const c = loadConfig(['--storage', 'etcd', '--etcd-servers', 'http://127.0.0.1:2379, https://e2:2379'], {}, '/srv');
  t.same(c.etcdServers, ['http://127.0.0.1:2379', 'https://e2:2379']);
  t.throws(() => loadConfig(['--storage', 'etcd', '--etcd-servers', 'e1:2379'], {}, '/srv'), /--etcd-servers .* must match pattern/);
  t.throws(() => loadConfig(['--etcd-certfile', 'c.pem'], {}, '/srv'), /--etcd-certfile and --etcd-keyfile go together/);
  t.throws(() => loadConfig(['--authentication-mode', 'magic'], {}, '/srv'), /--authentication-mode .* allowed values/);
});
