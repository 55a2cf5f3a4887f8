/** Acceptance: the real kubectl against the real server over TLS, on etcd (Debian's etcd-server). */
import t from 'tap';
import { startEtcd, type TestEtcd } from '../helpers/etcd.ts';
import { kubectlAcceptance } from './kubectl-acceptance.ts';

let etcd: TestEtcd | undefined;
t.teardown(async () => {
  await etcd?.stop();
});
kubectlAcceptance(t, async () => {
  etcd = await startEtcd();
  return ['--storage', 'etcd', '--etcd-servers', etcd.url];
});
