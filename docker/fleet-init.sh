# Makes what a fleet in containers needs, once, in the shared volume (docker/compose.yaml's init service):
# the fleet CA, a certificate for each component and for an operator, the fleet secret and the admin token.
set -e
F=${FLEET:-/fleet}
[ -f $F/ca/ca.key ] || fleetlm ca init --dir $F/ca
for c in "controlplane/cp controlplane" "node/node-1 node" "edge/edge edge"; do
  set -- $c
  [ -f $F/$2.crt ] || fleetlm ca issue --dir $F/ca --identity $1 --dns $2 --dns localhost --ip 127.0.0.1 --out $F/$2
done
[ -f $F/admin.crt ] || fleetlm ca issue --dir $F/ca --identity admin --dns localhost --out $F/admin
[ -f $F/fleet.secret ] || fleetlm keys new-secret $F/fleet.secret
[ -f $F/admin.token ] || fleetlm keys new-secret $F/admin.token
