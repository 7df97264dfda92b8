"""The built-in task's vocabulary: names and cities from many cultures, and the sentence shapes.

Pools are large on purpose: with a few dozen names a model memorises the vocabulary instead of learning
to copy a span from the sentence, and then garbles a name it never saw. They hold two-word and hyphenated
names, apostrophes, particles ("dos Santos", "van der Meer") and non-ASCII spellings, so the byte-level
tokenizer splits them in many ways. No entry occurs, as whole words, inside another entry or a sentence
shape (tests/data/test_builtin.py checks it), so an entity kept out of training is absent from every
training row, not only from its own slot.
"""

# First names: several cultures, hyphenated and two-word given names, non-ASCII spellings.
FIRST_NAMES = (
    # English-speaking
    "Ada", "Ben", "Chloe", "Tom", "Sam", "Theo", "Nora", "Felix", "Emily", "Jack", "Olivia", "Harry", "Grace",
    "Oliver", "Lucy", "Henry", "Alice", "George", "Ruby", "Arthur", "Megan", "Connor", "Holly", "Dylan",
    "Bethany", "Kyle", "Brooke", "Tyler", "Wesley", "Mary Beth",
    # Irish, Scottish, Welsh
    "Siobhán", "Niamh", "Oisín", "Aoife", "Seán", "Ciarán", "Eilidh", "Ruairí", "Rhys", "Carys", "Dafydd",
    # French
    "Camille", "Étienne", "Hélène", "Jean-Luc", "Amélie", "Benoît", "Céline", "François", "Margaux",
    "Anne-Sophie", "Gaël", "Noémie", "Loïc", "Solène",
    # Spanish and Latin American
    "María José", "Diego", "Lucía", "Alejandro", "Javier", "Carmen", "Mateo", "Valentina", "Andrés",
    "Ximena", "Rodrigo", "Paloma", "Joaquín", "Guadalupe", "Juan Pablo", "Inés", "Ignacio", "Renata", "Itzel",
    "Anahí", "Ana Sofía",
    # Portuguese and Brazilian
    "João", "Beatriz", "Gonçalo", "Leonor", "Thiago", "Raquel", "Vinícius", "Luana",
    # Italian
    "Giulia", "Matteo", "Chiara", "Lorenzo", "Francesca", "Alessandro", "Giorgia", "Niccolò",
    # German, Dutch, Nordic
    "Jürgen", "Lena", "Lukas", "Anneliese", "Matthias", "Sönke", "Greta", "Maximilian", "Wiebke", "Sander",
    "Fleur", "Bram", "Ingrid", "Søren", "Astrid", "Björn", "Linnéa", "Eero", "Sigrid", "Mikkel", "Aino",
    # Slavic, Baltic, Hungarian
    "Ivan", "Katarzyna", "Wojciech", "Zuzana", "Dragan", "Milica", "Ludmila", "Tomasz", "Małgorzata", "Jiří",
    "Anastasia", "Bogdan", "Yelena", "Oksana", "Dmitri", "Rūta", "Ieva", "Kārlis", "Zsófia", "Bence", "Ákos",
    # Greek, Turkish
    "Eleni", "Nikos", "Dimitra", "Yannis", "Elif", "Mehmet", "Zeynep", "Emre", "Ayşe", "Barış",
    # Arabic, Persian, Hebrew
    "Omar", "Amira", "Yusuf", "Layla", "Khalid", "Fatima", "Hamza", "Noor", "Tariq", "Salma", "Dariush",
    "Shirin", "Arash", "Parisa", "Noa", "Eitan", "Yael", "Avi",
    # South Asian
    "Priya", "Raj", "Aarav", "Ananya", "Vikram", "Lakshmi", "Arjun", "Deepika", "Sanjay", "Meera", "Rohan",
    "Kavya", "Ishaan", "Sunita",
    # East and South-East Asian
    "Wei", "Mei", "Xiaoming", "Zhiwei", "Hao", "Xin", "Kenji", "Hana", "Yuki", "Haruto", "Sakura", "Takeshi",
    "Aiko", "Ren", "Ayaka", "Shōta", "Yūko", "Min-jun", "Ji-woo", "Seo-yeon", "Hyun-woo", "Eun-ji",
    "Jae-sung", "Thảo", "Huy", "Phương", "Quang", "Somchai", "Ploy", "Nattapong", "Putri", "Budi", "Ayu",
    "Rizal", "Maricel",
    # African
    "Amara", "Chidi", "Ngozi", "Kwame", "Abena", "Tendai", "Zanele", "Oluwaseun", "Amani", "Kofi", "Thandiwe",
    "Sipho", "Folake", "Jabari", "Wanjiru", "Emeka", "Nia",
    # Māori, Pacific
    "Aroha", "Tāne", "Mere", "Sione",
    # initials outside ASCII, which the byte-level tokenizer splits unlike any English word
    "Émile", "Óscar", "Ángel", "Úrsula", "Ísak", "Ömer", "Ümit", "Çağla", "Şebnem", "Žofie", "Štěpán",
    "Čeněk", "Øystein", "Åsa", "Ólafur", "Ēriks",
    # and more of them, where a held-out first name or city starts with an initial that fewer than two
    # training ones start with (test_every_held_out_initial_is_trained says why)
    "Ágnes", "Íris", "Ívar", "Úlfar", "Úna", "Ümran", "Čedomir", "Łucja", "Łukasz", "Şule", "Żaneta", "Žarko",
    "Željko", "Živa", "Žydrūnas",
)
LAST_NAMES = (
    "Park", "Smith", "Garcia", "Novak", "Okafor", "Tanaka", "Rossi", "Khan", "Dubois", "Berg", "Silva", "Moreau",
    "Kowalski", "Lee", "Brown", "Johnson", "Williams", "Thompson", "O'Brien", "McAllister", "Fitzgerald",
    "Hughes", "Whitaker", "Bennett", "Crawford", "Ashworth", "O'Sullivan", "MacLeod", "Campbell", "Llewellyn",
    "Lefèvre", "Girard", "Fontaine", "Delacroix", "Rousseau", "Bélanger",
    "Fernández", "Rodríguez", "Martínez", "López", "De la Cruz", "Gutiérrez", "Sánchez", "Herrera", "Vargas",
    "Castillo", "Ortega", "Navarro", "Domínguez", "Hernández", "Ramírez", "Flores", "Morales", "Jiménez",
    "Quispe", "Mamani",
    "dos Santos", "Pereira", "Gonçalves", "Carvalho", "Araújo", "Ribeiro",
    "Bianchi", "Esposito", "Ricci", "Greco", "Marchetti", "De Luca", "Fabbri",
    "Müller", "Schmidt", "Schröder", "Weißmann", "Becker", "Hoffmann", "Krüger", "von Bülow",
    "van der Meer", "de Vries", "Jansen", "Bakker", "Visser",
    "Johansson", "Lindqvist", "Nyström", "Halvorsen", "Virtanen", "Korhonen", "Sørensen", "Eriksdóttir",
    "Gunnarsson",
    "Nowak", "Wiśniewski", "Dvořák", "Horváth", "Kovačević", "Petrović", "Ivanova", "Smirnov", "Shevchenko",
    "Popescu", "Georgiev", "Zieliński", "Kovács", "Nagy", "Tamm", "Petrauskas", "Bērziņš",
    "Papadopoulos", "Nikolaidis", "Yılmaz", "Öztürk", "Demir", "Şahin",
    "Haddad", "Al-Masri", "Nasser", "Abdullah", "Mansour", "Farouk", "El-Amin", "Saleh", "Tehrani", "Hosseini",
    "Karimi", "Cohen", "Levi", "Mizrahi", "Friedman",
    "Sharma", "Patel", "Iyer", "Reddy", "Chatterjee", "Banerjee", "Nair", "Gupta", "Singh", "Menon", "Desai",
    "Kapoor",
    "Wang", "Zhang", "Chen", "Liu", "Huang", "Zhao", "Wu", "Zhou", "Xu", "Guo", "Lin",
    "Sato", "Suzuki", "Takahashi", "Watanabe", "Yamamoto", "Nakamura", "Kobayashi", "Itō", "Saitō",
    "Matsumoto", "Ōkubo", "Kim", "Choi", "Jung", "Kang", "Yoon", "Lim",
    "Nguyễn", "Trần", "Lê", "Phạm", "Hoàng", "Vũ", "Đặng", "Srisuk", "Chaiyaporn", "Santoso", "Wijaya",
    "Reyes", "Bautista", "Mendoza",
    "Mensah", "Adeyemi", "Okonkwo", "Nwosu", "Mwangi", "Otieno", "Dlamini", "Nkosi", "Boateng", "Asante",
    "Abebe", "Tesfaye", "Diallo", "Traoré", "Ndiaye", "Banda", "Moyo", "Kamara",
    "Ngata", "Parata", "Tuilagi",
    "Østergaard", "Åberg", "Ćosić", "Čapek", "Šimić", "Żak", "Ünlü", "Çelik", "Ó Briain", "Ødegård",
    "Ávila", "Éluard", "Ōtani", "Đỗ", "Ülker",
)
CITIES = (
    # Europe
    "Lyon", "Paris", "Berlin", "Madrid", "Oslo", "Lisbon", "Vienna", "Prague", "Dublin", "Milan", "Kraków",
    "Zürich", "Malmö", "Göteborg", "Köln", "München", "Düsseldorf", "Genève", "Reykjavík", "Tromsø", "Łódź",
    "Gdańsk", "Wrocław", "Brno", "Bratislava", "Ljubljana", "Zagreb", "Sarajevo", "Belgrade", "Bucharest",
    "Thessaloniki", "Athens", "İstanbul", "Izmir", "Antalya", "Valencia", "Sevilla", "Bilbao", "Málaga",
    "Porto", "Coimbra", "Bordeaux", "Marseille", "Toulouse", "Strasbourg", "Aix-en-Provence", "Clermont-Ferrand",
    "Bruxelles", "Antwerp", "Rotterdam", "Den Haag", "Utrecht", "Amsterdam", "Hamburg", "Leipzig", "Dresden",
    "Salzburg", "Innsbruck", "Basel", "Lausanne", "Turin", "Naples", "Bologna", "Firenze", "Venice", "Palermo",
    "Edinburgh", "Glasgow", "Cardiff", "Manchester", "Bristol", "Belfast", "Cork", "Galway", "Helsinki",
    "Tampere", "Tallinn", "Riga", "Vilnius", "Stockholm", "Uppsala", "Bergen", "Aarhus", "Budapest",
    "Debrecen", "Kyiv", "Lviv", "Odesa", "Tbilisi", "Yerevan", "Baku", "Warsaw", "Poznań", "Luxembourg",
    "Valletta", "Nicosia", "San Sebastián", "Las Palmas", "Palma de Mallorca",
    # The Americas
    "New York", "Los Angeles", "San Francisco", "Boston", "Denver", "Austin", "Chicago", "Seattle",
    "New Orleans", "Las Vegas", "Salt Lake City", "Kansas City", "St. Louis", "Minneapolis", "Philadelphia",
    "Atlanta", "Miami", "Honolulu", "Anchorage", "Portland", "Nashville", "Toronto", "Montréal",
    "Québec City", "Vancouver", "Winnipeg", "Halifax", "Mexico City", "Guadalajara", "Monterrey", "Oaxaca",
    "Mérida", "Cancún", "Bogotá", "Medellín", "Cartagena", "Quito", "Lima", "Cusco", "La Paz", "Santiago",
    "Valparaíso", "Buenos Aires", "Córdoba", "Rosario", "Montevideo", "Asunción", "São Paulo",
    "Rio de Janeiro", "Belo Horizonte", "Salvador", "Brasília", "Florianópolis", "Recife", "Havana",
    "San Juan", "Santo Domingo", "Panama City", "Guatemala City", "Kingston", "Port of Spain", "Caracas",
    # Asia
    "Tokyo", "Ōsaka", "Kyōto", "Sapporo", "Fukuoka", "Nagoya", "Yokohama", "Seoul", "Busan", "Incheon",
    "Beijing", "Shanghai", "Guangzhou", "Shenzhen", "Chengdu", "Xi'an", "Hangzhou", "Hong Kong", "Taipei",
    "Kaohsiung", "Ulaanbaatar", "Hà Nội", "Ho Chi Minh City", "Đà Nẵng", "Huế", "Bangkok", "Chiang Mai",
    "Phuket", "Kuala Lumpur", "Penang", "Singapore", "Jakarta", "Yogyakarta", "Bandung", "Denpasar", "Manila",
    "Cebu", "Davao", "Phnom Penh", "Vientiane", "Yangon", "Dhaka", "Kathmandu", "Colombo", "Mumbai",
    "New Delhi", "Bengaluru", "Chennai", "Kolkata", "Hyderabad", "Jaipur", "Kochi", "Pune", "Ahmedabad",
    "Karachi", "Lahore", "Islamabad", "Tashkent", "Samarkand", "Almaty", "Tehran", "Isfahan", "Shiraz",
    "Erbil", "Beirut", "Amman", "Jerusalem", "Tel Aviv", "Haifa", "Riyadh", "Jeddah", "Doha", "Dubai",
    "Abu Dhabi", "Muscat", "Kuwait City", "Manama",
    # Africa
    "Cairo", "Alexandria", "Casablanca", "Marrakech", "Fès", "Tunis", "Algiers", "Khartoum", "Addis Ababa",
    "Nairobi", "Mombasa", "Kampala", "Kigali", "Dar es Salaam", "Zanzibar", "Lusaka", "Harare", "Maputo",
    "Johannesburg", "Cape Town", "Durban", "Windhoek", "Gaborone", "Luanda", "Kinshasa", "Lagos", "Abuja",
    "Accra", "Kumasi", "Lomé", "Dakar", "Abidjan", "Bamako", "Ouagadougou", "Antananarivo", "Port Louis",
    # Oceania
    "Sydney", "Melbourne", "Brisbane", "Perth", "Adelaide", "Hobart", "Darwin", "Canberra", "Auckland",
    "Wellington", "Christchurch", "Queenstown", "Suva", "Nouméa", "Apia",
    # initials outside ASCII, which the byte-level tokenizer splits unlike any English word
    "Évora", "Ålesund", "Åre", "Óbidos", "Ústí nad Labem", "Škofja Loka", "České Budějovice", "Ōita",
    "Üsküdar", "Çeşme", "Şanlıurfa", "Épernay", "Örebro", "Île-de-Bréhat", "Żywiec", "Úbeda", "Ōmura", "Şile",
    "Żagań",
)
# Practice entities, in training rows only: given names and places that SmolLM2's tokenizer writes as one token
# after a space (" Kathleen", " Nebraska") and in two or more pieces after a quote ('"Kath' + 'leen'). An
# answer's value starts right after a quote, so the model must re-spell the sentence's token rather than copy
# it: the skill that the held-out names it garbled most need ("Wei", "Santiago", "Valentina"). They are dealt
# together with the training pools, so 400 training rows still hold every training name and city.
PRACTICE_FIRST_NAMES = (
    "Aaron", "Abraham", "Adrian", "Ahmad", "Alison", "Alma", "Amelia", "Andreas", "Annie", "Antonio", "Ashley",
    "Benjamin", "Billy", "Boris", "Brian", "Bryan", "Carlos", "Cecil", "Christina", "Christopher", "Clara", "Colin",
    "Craig", "Daisy", "Deborah", "Diana", "Dorothy", "Edgar", "Edmund", "Eleanor", "Elijah", "Ella", "Emma", "Erik",
    "Ernest", "Ethan", "Fernando", "Frances", "Frederick", "Gabriel", "Geoffrey", "Glenn", "Gregory", "Hannah",
    "Harold", "Heather", "Helena", "Hugo", "Isaac", "Isabella", "Janet", "Jeffrey", "Jenny", "Jerome", "Jessica",
    "Joan", "Johann", "Jonathan", "Jose", "Joyce", "Julia", "Julie", "Karen", "Kate", "Kathleen", "Kelly", "Kevin",
    "Lars", "Lauren", "Leslie", "Lisa", "Louise", "Ludwig", "Manuel", "Marcus", "Mario", "Martha", "Melissa",
    "Miguel", "Miranda", "Molly", "Nancy", "Nathan", "Nicole", "Noah", "Otto", "Patricia", "Pedro", "Philip",
    "Rachel", "Raymond", "Robin", "Roland", "Rosa", "Ryan", "Samantha", "Sean", "Seth", "Sharon", "Sidney",
    "Sophia", "Stefan", "Steven", "Susan", "Terry", "Timothy", "Vincent", "Walter", "Werner", "Winston",
)
PRACTICE_PLACES = (
    "Afghanistan", "Alaska", "Albany", "Algeria", "Antarctica", "Arizona", "Arlington", "Augusta", "Baghdad",
    "Bali", "Bangladesh", "Bavaria", "Belarus", "Belize", "Berkeley", "Bethlehem", "Birmingham", "Bonn", "Bosnia",
    "Boulder", "Brooklyn", "Brunswick", "Calgary", "Cameroon", "Carolina", "Chester", "Cincinnati", "Cologne",
    "Colorado", "Concord", "Connecticut", "Cornwall", "Croatia", "Cyprus", "Dallas", "Dayton", "Denmark", "Detroit",
    "Dover", "Ecuador", "Essex", "Ethiopia", "Fiji", "Florence", "Galveston", "Georgia", "Gibraltar", "Gloucester",
    "Greenland", "Guam", "Haiti", "Hampton", "Hartford", "Hawaii", "Holland", "Houston", "Idaho", "Indiana", "Iowa",
    "Ireland", "Jersey", "Kashmir", "Kentucky", "Kerala", "Kosovo", "Lancaster", "Latvia", "Leeds", "Leiden",
    "Liberia", "Lithuania", "Louisiana", "Macedonia", "Maine", "Malaysia", "Malta", "Manitoba", "Mecca", "Memphis",
    "Milwaukee", "Mississippi", "Mongolia", "Monterey", "Moscow", "Myanmar", "Namibia", "Nebraska", "Netherlands",
    "Newcastle", "Nicaragua", "Norfolk", "Norway", "Nuremberg", "Ohio", "Omaha", "Ontario", "Orlando", "Paraguay",
    "Pennsylvania", "Petersburg", "Phoenix", "Pittsburgh", "Poland", "Portugal", "Princeton", "Qatar", "Raleigh",
    "Riverside", "Romania", "Sacramento", "Salisbury", "Savannah", "Scotland", "Serbia", "Siberia", "Slovakia",
    "Somalia", "Springfield", "Suffolk", "Surrey", "Sweden", "Syracuse", "Taiwan", "Tanzania", "Tennessee",
    "Toledo", "Tucson", "Uganda", "Uruguay", "Uzbekistan", "Vermont", "Vietnam", "Warwick", "Westminster",
    "Windsor", "Worcester", "Wyoming", "Yorkshire", "Zambia",
)
# Sentence shapes: each slot's position, casing and punctuation vary, and some shapes carry a line break,
# a form layout or a word that is not part of any field, so no fixed position or neighbour gives a slot away.
TEMPLATES = (
    "Book a table for {guests} in {city} on {day}, name {name}.",
    "{name} would like a table for {guests} in {city} on {day}.",
    "Hi, this is {name}. Can I reserve a table for {guests_word} in {city} on {day}?",
    "Reservation: {city}, {day}, {guests} guests, under {name}.",
    "Please hold a table in {city} on {day} for {name}, party of {guests}.",
    "{name} here, we are {guests_word} people and want to eat in {city} on {day}.",
    "Could you book a table in {city} for {day}? Name is {name}, {guests} people.",
    "On {day}, {name} is bringing a group of {guests} to the {city} restaurant.",
    "I'd like to book for {guests} on {day}. Location: {city}. Name: {name}.",
    "{guests} people, {day}, {city}. The booking is for {name}.",
    "My name is {name} and I need a table in {city} for {guests_word} on {day}.",
    "Table for {guests_word} at the {city} branch this {day}, please. {name}.",
    "We'd love to dine in {city} on {day}: {guests} of us, booked as {name}.",
    "{city} on {day} for {guests} guests, please put it under {name}.",
    "Hello! {name} booking a table, {day} in {city}, {guests} seats.",
    "Is there room for {guests} on {day} in {city}? Reserve it for {name}.",
    "Dear team, {name} requesting a table for {guests_word} on {day} at your {city} location. Thanks!",
    "sms from {name}: need a table, {guests} ppl, {city}, {day}",
    "Name: {name} | City: {city} | Day: {day} | Guests: {guests}",
    "guests={guests}; day={day}; city={city}; name={name}",
    "Booking request\nName: {name}\nWhere: {city}\nWhen: {day}\nParty size: {guests}",
    "Can {name} get a table for {guests_word} on {day}? We'll be in {city}.",
    "It's {name} again. {day} works for us in {city}, {guests} people.",
    "{name} ({guests} guests) wants {city} on {day}.",
    "For {day}: a table in {city}, {guests} covers, booked by {name}.",
    "Hey there, could you squeeze in {guests_word} of us on {day}? {city} please. Cheers, {name}",
    "Party of {guests} for {name}, {city}, {day} evening.",
    "Please confirm: {name}, {guests} people, {day}, {city} restaurant.",
    "We are a group of {guests_word}. City: {city}. Day: {day}. Contact: {name}.",
    "{day} dinner in {city} for {guests} - reservation name {name}.",
    "Reserve {guests} seats in {city} for {name} on {day}, at dinner time.",
    "Could I get a table on {day} in {city}? It's for {name} and {guests_word} guests in total.",
    "Message from {name}: we'd like to come to your {city} restaurant on {day}, {guests} of us.",
    "Table request - {city}, {day}. Guests: {guests}. Booked under the name {name}.",
    "{name} called to book {guests_word} seats at the {city} place for {day}.",
    "Any chance of a table for {guests} in {city}, {day}? Ask for {name}.",
    "Our party of {guests_word} ({name}) will dine in {city} on {day}.",
    "New booking: {name} / {city} / {day} / {guests} pax",
    "I'm {name}. {guests} of us are visiting {city} and want dinner on {day}.",
    "Please book {name} in at {city} for {day}; there will be {guests} guests.",
    "On behalf of {name}: {guests_word} people, {city}, this coming {day}.",
)
