# Shared by the black-box suite scripts (sourced, not run). Before sourcing,
# set SUITE (the suite's name, for messages) and REPO_ROOT.

# Installs Debian packages, or explains why it cannot.
apt_install() {
    if command -v apt-get >/dev/null 2>&1; then
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null
    else
        echo "$SUITE: missing $* and no apt-get to install it" >&2
        exit 1
    fi
}

# Checks that the server under test (HS_KIND) can be started: the
# tessera-node binary exists, or Synapse is installed.
prepare_server_under_test() {
    case "$HS_KIND" in
        tessera)
            local bin="$TESSERA_NODE_BIN"
            case "$bin" in /*) ;; *) bin="$REPO_ROOT/$bin" ;; esac
            if [ ! -x "$bin" ]; then
                echo "$SUITE: tessera-node binary not found at $bin (build it or set TESSERA_NODE_BIN)" >&2
                exit 1
            fi
            ;;
        synapse)
            bash "$REPO_ROOT/scripts/install-synapse.sh"
            ;;
        *)
            echo "$SUITE: HS_KIND must be tessera or synapse, not $HS_KIND" >&2
            exit 1
            ;;
    esac
}
