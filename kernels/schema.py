"""The raw transaction schema and the feature layout shared by training and serving.

Raw transactions (one row per card payment), as received over gRPC or read from
Parquet/CSV by the build pipeline:

==============  ========  ==========================================================
column          type      meaning
==============  ========  ==========================================================
transaction_id  string    unique id of the payment (not a model input)
card_id         string    card (PAN token); hashed to a 64-bit key, never stored raw
merchant_id     string    merchant; hashed to a 64-bit key
mcc             int       ISO 18245 merchant category code, 0..9999
amount          float     amount in the transaction currency, >= 0
currency        string    ISO 4217 alphabetic code, e.g. "EUR"
country         string    ISO 3166-1 alpha-2 country of the merchant/terminal
card_country    string    ISO 3166-1 alpha-2 country that issued the card
channel         string    one of CHANNELS
event_time      timestamp UTC time of the payment (epoch milliseconds on the wire)
label           int       training only: 1 = fraud, 0 = legitimate
==============  ========  ==========================================================

Categorical strings are encoded with fixed vocabularies (below), so a code never
depends on the training data: unknown values encode to -1, which LightGBM and the
forest kernel route like a missing category.
"""

from __future__ import annotations

from typing import Final

RAW_STRING_COLUMNS: Final = (
    "transaction_id",
    "card_id",
    "merchant_id",
    "currency",
    "country",
    "card_country",
    "channel",
)
RAW_INT_COLUMNS: Final = ("mcc",)
RAW_FLOAT_COLUMNS: Final = ("amount",)
TIME_COLUMN: Final = "event_time"
LABEL_COLUMN: Final = "label"
RAW_COLUMNS: Final = (
    "transaction_id",
    "card_id",
    "merchant_id",
    "mcc",
    "amount",
    "currency",
    "country",
    "card_country",
    "channel",
    "event_time",
)
# Raw inputs that feed the model (transaction_id does not).
MODEL_INPUT_COLUMNS: Final = RAW_COLUMNS[1:]

CHANNELS: Final = ("pos", "ecommerce", "atm", "moto", "contactless")

# ISO 4217 codes we encode; others map to -1 (unknown).
CURRENCIES: Final = (
    "EUR", "USD", "GBP", "CHF", "SEK", "NOK", "DKK", "PLN", "CZK", "HUF",
    "RON", "BGN", "TRY", "RUB", "UAH", "JPY", "CNY", "HKD", "SGD", "KRW",
    "INR", "AUD", "NZD", "CAD", "MXN", "BRL", "ARS", "CLP", "COP", "PEN",
    "ZAR", "NGN", "KES", "EGP", "MAD", "AED", "SAR", "ILS", "THB", "MYR",
    "IDR", "PHP", "VND",
)  # fmt: skip

# ISO 3166-1 alpha-2 codes (all officially assigned ones), in a fixed order.
COUNTRIES: Final = tuple(
    """AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ BA BB BD BE BF BG BH BI BJ BL BM
    BN BO BQ BR BS BT BV BW BY BZ CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY
    CZ DE DJ DK DM DO DZ EC EE EG EH ER ES ET FI FJ FK FM FO FR GA GB GD GE GF GG GH GI
    GL GM GN GP GQ GR GS GT GU GW GY HK HM HN HR HT HU ID IE IL IM IN IO IQ IR IS IT JE
    JM JO JP KE KG KH KI KM KN KP KR KW KY KZ LA LB LC LI LK LR LS LT LU LV LY MA MC MD
    ME MF MG MH MK ML MM MN MO MP MQ MR MS MT MU MV MW MX MY MZ NA NC NE NF NG NI NL NO
    NP NR NU NZ OM PA PE PF PG PH PK PL PM PN PR PS PT PW PY QA RE RO RS RU RW SA SB SC
    SD SE SG SH SI SJ SK SL SM SN SO SR SS ST SV SX SY SZ TC TD TF TG TH TJ TK TL TM TN
    TO TR TT TV TW TZ UA UG UM US UY UZ VA VC VE VG VI VN VU WF WS YE YT ZA ZM ZW""".split()  # noqa: SIM905 (a 249-item literal would be unreadable)
)

MCC_MAX: Final = 9999

# Model features, in the column order of the LightGBM model and the forest kernel.
# Stateful features describe the card's history *before* the current transaction.
FEATURE_NAMES: Final = (
    # stateless
    "amount",
    "log_amount",
    "hour_sin",
    "hour_cos",
    "dow_sin",
    "dow_cos",
    "is_foreign",
    "channel",
    "mcc",
    "country",
    "currency",
    # stateful, per card
    "card_count_1h",
    "card_count_24h",
    "card_count_7d",
    "card_amount_1h",
    "card_amount_24h",
    "card_amount_7d",
    "secs_since_prev",
    "amount_to_mean",
    "amount_zscore",
    "is_new_merchant",
    "is_new_country",
    "card_txn_count",
)
NUM_FEATURES: Final = len(FEATURE_NAMES)
# Features LightGBM treats as categorical (integer codes, -1 = unknown).
CATEGORICAL_FEATURES: Final = ("channel", "mcc", "country", "currency")
